"""What a ``torch.fx`` trace does not show: checks that the traced graph is the function autograd
differentiates.

The compiler turns the traced operations into a graph whose backward pass is exact
backpropagation *of those operations*. Four things make the module's gradient differ from
that, and a trace alone hides each of them:

* **grad-mode changes** — ``with torch.no_grad():`` / ``torch.set_grad_enabled(False)`` in
  ``forward`` are not recorded as nodes (torch 2.2); the tracer stamps every node with the
  grad mode it was created under (:func:`grad_mode_meta`) and :func:`check_autograd_semantics`
  refuses the nodes created with gradients off;
* **gradient-stopping operations** — ``.detach()``, ``.data``, ``requires_grad_``;
* **custom** ``torch.autograd.Function`` — fx traces the operations of its ``forward`` and
  drops its ``backward``; the tracer records the Function class a node was created inside
  (:func:`enclosing_autograd_function`);
* **in-place mutation** — ``h += g``, ``x.mul_(0.5)``, ``F.relu(x, inplace=True)`` change a
  tensor after other operations took it as their input: the graph would feed a later reader of
  the tensor (or of a view of it) the values from before the change. :class:`MutationWatch`
  runs alongside the compiler's shape pass and refuses exactly those reads, using torch's
  per-storage version counters (shared by a tensor and all its views), so in-place operations
  whose old values nobody reads again — ``nn.ReLU(inplace=True)`` in an ``nn.Sequential`` —
  compile as before.

Module backward hooks (which change the gradient and never run on the graph) are refused too.
Every refusal is one :class:`~mpbackprop.errors.UnsupportedOpError` line naming the operation,
where it is, and what to write instead.
"""

from __future__ import annotations

import sys
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
from torch import Tensor

from ..errors import UnsupportedOpError

__all__ = ["MutationWatch", "check_autograd_semantics", "enclosing_autograd_function", "grad_mode_meta"]

#: ``describe(node)`` → "what at where", e.g. "Tensor.detach in traced node 'detach' at model.py:12".
Describe = Callable[[torch.fx.Node], str]

#: The code of ``Function.apply`` where it is Python (torch 2.2); None where it is a C method (newer torch),
#: which leaves no frame: there the ``forward``'s ``ctx`` names the class (below).
_APPLY_CODE = getattr(getattr(torch.autograd.function.Function.__dict__["apply"], "__func__", None), "__code__", None)
_KEEP_LAYER_FIXED = "to keep a layer fixed, set its parameters' requires_grad to False instead"
_GRAD_STOPPING_METHODS = frozenset({"detach", "detach_", "requires_grad_"})
_GRAD_STOPPING_ATTRS = frozenset({"data"})
_GRAD_MODE_FUNCTIONS = {getattr(torch._C, name) for name in ("_set_grad_enabled",) if hasattr(torch._C, name)}
#: Reads that see only a tensor's metadata (shape, dtype), which in-place operations do not change.
_METADATA_METHODS = frozenset({"size", "dim"})
_METADATA_ATTRS = frozenset({"shape", "dtype", "device", "ndim"})


def enclosing_autograd_function() -> type | None:
    """The ``torch.autograd.Function`` subclass whose ``apply`` is running up the call stack, if any."""
    frame = sys._getframe(1)
    while frame is not None:
        if _APPLY_CODE is not None and frame.f_code is _APPLY_CODE:
            cls = frame.f_locals.get("cls")
            return cls if isinstance(cls, type) else torch.autograd.Function
        if frame.f_code.co_name == "forward":  # a Function's forward(ctx, ...): ctx's class knows the Function
            owner = getattr(type(frame.f_locals.get("ctx")), "_forward_cls", None)
            if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
                return owner
        frame = frame.f_back  # type: ignore[assignment]
    return None


def grad_mode_meta() -> dict[str, Any]:
    """What :func:`check_autograd_semantics` needs to know about a node being created now."""
    return {
        "grad_enabled": torch.is_grad_enabled(),
        "inference_mode": torch.is_inference_mode_enabled(),
        "autograd_function": enclosing_autograd_function(),
    }


def _backward_hooked(root: nn.Module) -> str | None:
    """Path of the first submodule with a backward hook ("" for the root), or None."""
    for path, mod in root.named_modules():
        if getattr(mod, "_backward_hooks", None) or getattr(mod, "_backward_pre_hooks", None):
            return path
    return None


def check_autograd_semantics(gm: torch.fx.GraphModule, root: nn.Module, describe: Describe,
                             path: Callable[[str], str], inference_mode: bool) -> None:
    """Refuse what makes the module's gradient differ from backprop through the traced operations.

    ``describe`` names a node and where it is; ``path`` maps a traced module path to the user's;
    ``inference_mode`` is the inference mode the trace started in (nodes are compared with it).
    """
    hooked = _backward_hooked(root)
    if hooked is not None:
        name = path(hooked)
        what = f"module '{name}' ({type(root.get_submodule(hooked)).__name__})" if name else "the model"
        raise UnsupportedOpError(
            f"{what} has a backward hook, which changes its gradient and does not run on the compiled graph; "
            "remove the hook (register_full_backward_hook / register_backward_hook)"
        )
    if getattr(nn.modules.module, "_global_backward_hooks", None) or getattr(
            nn.modules.module, "_global_backward_pre_hooks", None):
        raise UnsupportedOpError(
            "a global module backward hook is registered (torch.nn.modules.module.register_module_full_backward_hook), "
            "which the compiled graph would not run; remove it before compiling"
        )
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        fn = node.meta.get("autograd_function")
        if fn is not None:
            raise UnsupportedOpError(
                f"custom autograd Function {fn.__name__} (its forward runs {describe(node)}): the graph would "
                f"follow the operations of {fn.__name__}.forward and ignore its backward, so the gradients "
                "would not be the module's; write the forward with supported operations instead of "
                f"{fn.__name__}.apply"
            )
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target in _GRAD_MODE_FUNCTIONS:
            raise UnsupportedOpError(
                f"the forward switches gradients on or off ({describe(node)}): the engine's backward pass goes "
                f"through every operation; remove torch.no_grad()/set_grad_enabled ({_KEEP_LAYER_FIXED})"
            )
        if node.meta.get("grad_enabled") is False or node.meta.get("inference_mode", inference_mode) != inference_mode:
            mode = "torch.inference_mode()" if node.meta.get("inference_mode") else \
                "torch.no_grad() or torch.set_grad_enabled(False)"
            raise UnsupportedOpError(
                f"{describe(node)} runs with gradients disabled ({mode} in forward): the engine's backward pass "
                "goes through every operation, so its gradients would not be the module's; remove the block "
                f"({_KEEP_LAYER_FIXED})"
            )
        stops = (node.op == "call_method" and node.target in _GRAD_STOPPING_METHODS) or (
            node.op == "call_function" and node.target is torch.detach) or (
            node.op == "call_function" and node.target is getattr and len(node.args) > 1
            and node.args[1] in _GRAD_STOPPING_ATTRS)
        if stops:
            raise UnsupportedOpError(
                f"{describe(node)} stops or changes the gradient, which the engine's backward pass cannot "
                f"express; remove it ({_KEEP_LAYER_FIXED})"
            )


def _reads_values(node: torch.fx.Node) -> bool:
    """Whether ``node`` reads the values of its tensor inputs (not only their shape)."""
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return False
    if node.op == "call_function" and node.target is getattr and len(node.args) > 1:
        return node.args[1] not in _METADATA_ATTRS
    return True


def _version(t: Tensor) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # inference tensors keep no version counter
        return None


def _storage(t: Tensor) -> int:
    try:
        return int(t.untyped_storage().data_ptr())
    except RuntimeError:  # pragma: no cover - tensors without storage (sparse, ...)
        return id(t)


class MutationWatch:
    """Refuse reads of tensors that an in-place operation changed after they were computed.

    Call :meth:`before` with each node before it runs and :meth:`after` with its result. A node
    ``V``'s value is what the compiled graph holds for it; when a later node reads ``V`` after
    ``V``'s storage was changed in place (through ``V`` or any view of it), the graph and the
    module disagree, and :meth:`before` raises, naming the in-place operation and the reader.
    """

    def __init__(self, describe: Describe) -> None:
        self.describe = describe
        self.versions: dict[torch.fx.Node, int] = {}
        self.mutators: dict[int, torch.fx.Node] = {}  # storage -> last node that changed it in place
        self._inputs: list[tuple[torch.fx.Node, Tensor, int]] = []

    def _tensor_inputs(self, node: torch.fx.Node) -> list[tuple[torch.fx.Node, Tensor]]:
        out = []
        for arg in node.all_input_nodes:
            value = arg.meta.get("value")
            if isinstance(value, Tensor):
                out.append((arg, value))
        return out

    def before(self, node: torch.fx.Node) -> None:
        inputs = self._tensor_inputs(node)
        if _reads_values(node):
            for arg, value in inputs:
                recorded = self.versions.get(arg)
                now = _version(value)
                if recorded is not None and now is not None and now != recorded:
                    raise self._stale(arg, value, node)
        self._inputs = [(arg, value, v) for arg, value in inputs if (v := _version(value)) is not None]

    def after(self, node: torch.fx.Node, result: Any) -> None:
        for _arg, value, version in self._inputs:
            if _version(value) != version:
                self.mutators[_storage(value)] = node
        self._inputs = []
        if isinstance(result, Tensor):
            v = _version(result)
            if v is not None:
                self.versions[node] = v

    def _stale(self, arg: torch.fx.Node, value: Tensor, reader: torch.fx.Node) -> UnsupportedOpError:
        mutator = self.mutators.get(_storage(value))
        what = self.describe(mutator) if mutator is not None else "an in-place operation"
        who = "the network's output" if reader.op == "output" else self.describe(reader)
        return UnsupportedOpError(
            f"in-place {what} changes a tensor (traced node '{arg.name}') that {who} reads afterwards, directly "
            "or through a view: the compiled graph would use the values from before the change, so its output "
            "and gradients would differ from the module's; compute a new tensor instead (h = h + g, not h += g; "
            "x.mul(0.5), not x.mul_(0.5); inplace=False)"
        )
