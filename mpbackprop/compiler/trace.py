"""Compile a ``torch.nn.Module`` into neuron blocks and weight uses (method.md §1).

The module is traced with :mod:`torch.fx`, so ``nn.Sequential`` and hand-written
``forward`` methods compile alike, in module and functional form. The walk over
the traced graph turns every supported operation into a :class:`~mpbackprop.graph.layers.Layer`
plus its edges:

* layer modules and functions: the registered kind that traces them (:mod:`mpbackprop.kinds`, one
  module per kind) adds the block and its edges — ``Linear`` / ``Conv2d`` one *use* ``(i, p, j)``
  per multiply ``z_j += w_p·a_i``, pooling fixed-coefficient neuron→neuron edges, ...;
* residual ``+``/``-``, scaling by a constant: fixed-coefficient neuron→neuron edges.
* Activations become a property of the neurons they act on; a second activation
  on the same values (or one applied to values also used raw) gets its own block
  joined by identity edges.
* ``flatten``/``view``/``reshape`` are re-indexings: no neurons, only a view shape.

Anything else is refused with one line that names the operation and where it is.
"""

from __future__ import annotations

import math
import operator
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..graph.activations import Activation
from .budget import GraphTooLargeError, check_budget, estimate
from ..errors import MPBackpropError, ShapeError, UnsupportedOpError
from .. import kinds as _kinds
from ..kinds import LayerEdges, supported_text
from ..graph.layers import Layer, ParamTensor
from .tracecheck import MutationWatch, check_autograd_semantics, grad_mode_meta

__all__ = ["LayerEdges", "Trace", "check_input_shape", "trace_module", "SUPPORTED"]

_KIND_LAYERS, _KIND_COMBINATIONS = supported_text()
SUPPORTED = (
    f"{_KIND_LAYERS}, ReLU, LeakyReLU, ELU, GELU, SiLU, Tanh, "
    f"Sigmoid, Softplus, Identity, Flatten/view/reshape, {_KIND_COMBINATIONS}"
)


@dataclass
class Trace:
    """What the compiler extracted from a module: blocks, their edges and parameter values."""

    layers: list[Layer]
    edges: list[LayerEdges | None]
    values: Tensor  # flat parameter values in param-node order
    input_shape: tuple[int, ...]
    output_layer: int
    output_shape: tuple[int, ...] | None = None  # the view the module returns (flatten/view of the block)
    graph_module: torch.fx.GraphModule | None = None  # the trace itself (for checks against the module)
    block_nodes: list[str] = field(default_factory=list)  # per block: the traced node holding its values a


@dataclass
class _Ref:
    """A traced tensor value: the post-activation values of ``block`` seen in ``shape``."""

    block: int
    shape: tuple[int, ...]
    fresh: bool  # the block's activation may still be folded in


_MODULE_ACTS: dict[type, Callable[[nn.Module], Activation]] = {
    nn.ReLU: lambda m: Activation("relu"),
    nn.LeakyReLU: lambda m: Activation("leaky_relu", {"negative_slope": float(m.negative_slope)}),
    nn.ELU: lambda m: Activation("elu", {"alpha": float(m.alpha)}),
    nn.GELU: lambda m: Activation("gelu", {"approximate": m.approximate}),
    nn.SiLU: lambda m: Activation("silu"),
    nn.Tanh: lambda m: Activation("tanh"),
    nn.Sigmoid: lambda m: Activation("sigmoid"),
    nn.Softplus: lambda m: Activation("softplus", {"beta": float(m.beta), "threshold": float(m.threshold)}),
}


def _arg(node: torch.fx.Node, i: int, name: str, default: Any) -> Any:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _function_act(node: torch.fx.Node) -> Activation | None:
    t = node.target
    if t in (F.relu, torch.relu):
        return Activation("relu")
    if t is F.leaky_relu:
        return Activation("leaky_relu", {"negative_slope": float(_arg(node, 1, "negative_slope", 0.01))})
    if t is F.elu:
        return Activation("elu", {"alpha": float(_arg(node, 1, "alpha", 1.0))})
    if t is F.gelu:
        return Activation("gelu", {"approximate": node.kwargs.get("approximate", "none")})
    if t is F.silu:
        return Activation("silu")
    if t in (torch.tanh, F.tanh):
        return Activation("tanh")
    if t in (torch.sigmoid, F.sigmoid):
        return Activation("sigmoid")
    if t is F.softplus:
        return Activation(
            "softplus",
            {"beta": float(_arg(node, 1, "beta", 1.0)), "threshold": float(_arg(node, 2, "threshold", 20.0))},
        )
    return None


_METHOD_ACTS = {"relu": "relu", "tanh": "tanh", "sigmoid": "sigmoid"}
_RESHAPE_FUNCS = (torch.flatten, torch.reshape)
_RESHAPE_METHODS = ("view", "reshape", "flatten", "contiguous")
_ADD_FUNCS = (operator.add, operator.iadd, torch.add)
_SUB_FUNCS = (operator.sub, operator.isub, torch.sub)
_MUL_FUNCS = (operator.mul, operator.imul, torch.mul)
_DIV_FUNCS = (operator.truediv, operator.itruediv, torch.div)
_ARITH_METHODS = {"add": operator.add, "sub": operator.sub, "mul": operator.mul, "div": operator.truediv,
                  "add_": operator.add, "sub_": operator.sub, "mul_": operator.mul, "div_": operator.truediv}


_INPLACE_OPERATORS = {
    "__iadd__": operator.iadd, "__isub__": operator.isub, "__imul__": operator.imul,
    "__itruediv__": operator.itruediv, "__ifloordiv__": operator.ifloordiv, "__imod__": operator.imod,
    "__ipow__": operator.ipow, "__imatmul__": operator.imatmul, "__iand__": operator.iand,
    "__ior__": operator.ior, "__ixor__": operator.ixor, "__ilshift__": operator.ilshift,
    "__irshift__": operator.irshift,
}


_AUGMENTED_SYMBOLS = {
    operator.iadd: "+=", operator.isub: "-=", operator.imul: "*=", operator.itruediv: "/=",
    operator.ifloordiv: "//=", operator.imod: "%=", operator.ipow: "**=", operator.imatmul: "@=",
    operator.iand: "&=", operator.ior: "|=", operator.ixor: "^=", operator.ilshift: "<<=", operator.irshift: ">>=",
}


class _Proxy(torch.fx.Proxy):
    """A proxy that records augmented assignment as the in-place operator it is on tensors.

    ``torch.fx.Proxy`` has no ``__iadd__``, so ``h += g`` would be traced as ``h = h + g``; on a
    tensor it changes ``h`` in place, and whoever still holds the old ``h`` (``skip = h`` before
    it) sees the change. Recording ``operator.iadd`` lets the shape pass replay the mutation and
    :class:`~mpbackprop.compiler.tracecheck.MutationWatch` refuse reads of the changed tensor.
    """


def _inplace_method(op: Callable[[Any, Any], Any]) -> Callable[[_Proxy, Any], Any]:
    def _traced_inplace_operator(self: _Proxy, other: Any) -> Any:  # name known to _user_frame
        return self.tracer.create_proxy("call_function", op, (self, other), {})
    return _traced_inplace_operator


for _name, _op in _INPLACE_OPERATORS.items():
    setattr(_Proxy, _name, _inplace_method(_op))


class _Tracer(torch.fx.Tracer):
    """``torch.fx`` tracer that records source lines for error messages, augmented assignment as
    in-place operators, and per node the grad mode and enclosing ``autograd.Function`` it was
    created under (:func:`~mpbackprop.compiler.tracecheck.grad_mode_meta`)."""

    def __init__(self) -> None:
        super().__init__()
        self.record_stack_traces = True

    def proxy(self, node: torch.fx.Node) -> torch.fx.Proxy:
        return _Proxy(node, self)

    def create_node(self, *args: Any, **kwargs: Any) -> torch.fx.Node:
        node = super().create_node(*args, **kwargs)
        node.meta.update(grad_mode_meta())
        return node


#: Frames under these directories are library code, never the user's (compared by real path,
#: so a user project in a folder that happens to be called ``torch`` or ``mpbackprop`` still counts).
_TORCH_DIR = os.path.join(os.path.realpath(os.path.dirname(torch.__file__)), "")
_PACKAGE_DIR = os.path.join(os.path.realpath(os.path.dirname(os.path.dirname(__file__))), "")  # mpbackprop/


#: Frames of the tracer's own methods that torch.fx calls while the model's line runs (callees, not callers).
_TRACER_HOOKS = (" in _traced_inplace_operator", " in create_node", " in create_proxy")


def _user_frame(tb_text: str) -> str:
    """Pick ``file:line`` of the innermost frame of the traced model's own code.

    Frames are listed outermost first: whoever called the compiler (a script, click), then
    mpbackprop, then torch.fx, then the model's ``forward``. Only frames *after* the last
    mpbackprop frame belong to the model; torch's own frames are skipped. No such frame (a
    layer inside ``nn.Sequential``) gives ``""``: the module path then says where it is.
    """
    where = ""
    for line in tb_text.splitlines():
        line = line.strip()
        if not line.startswith('File "'):
            continue
        try:
            path = line.split('"')[1]
            lineno = line.split('", line ')[1].split(",")[0]
        except IndexError:  # pragma: no cover - unusual traceback text
            continue
        real = os.path.realpath(path)
        if real.startswith(_PACKAGE_DIR) and line.endswith(_TRACER_HOOKS):
            continue  # the tracer's own hooks, called from the model's line (newer torch lists create_node)
        if real.startswith(_PACKAGE_DIR):
            where = ""  # everything so far was the compiler's caller
        elif not real.startswith(_TORCH_DIR):
            where = f"{os.path.basename(path)}:{lineno}"
    return where


def _where(node: torch.fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        mod = root.get_submodule(str(node.target))
        loc = f"module '{node.target}' ({type(mod).__name__})"
    else:
        loc = f"traced node '{node.name}'"
    src = _user_frame(node.stack_trace or "")
    return f"{loc} at {src}" if src else loc


def _describe(node: torch.fx.Node, root: nn.Module) -> str:
    if node.op == "call_module":
        return type(root.get_submodule(str(node.target))).__name__
    if node.op == "call_function":
        if node.target in _AUGMENTED_SYMBOLS:
            return f"'{_AUGMENTED_SYMBOLS[node.target]}'"
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "get_attr":
        return f"tensor attribute '{node.target}'"
    return node.op


def symbolic_trace(model: nn.Module) -> torch.fx.GraphModule:
    """Trace ``model`` with :mod:`torch.fx`, turning tracing failures into one clear line."""
    tracer = _Tracer()
    try:
        with torch.enable_grad():  # node grad modes then show the model's own switches only
            graph = tracer.trace(model)
    except MPBackpropError:
        raise
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported the same way
        where = _user_frame(traceback.format_exc())
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "control flow" in msg:
            what = "data-dependent control flow"
        else:
            what = f"an operation torch.fx cannot trace ({type(exc).__name__}: {msg})"
        at = f" at {where}" if where else ""
        raise UnsupportedOpError(
            f"cannot compile {type(model).__name__}: {what}{at}; mpbackprop needs a forward pass "
            "without Python branching on tensor values"
        ) from exc
    return torch.fx.GraphModule(tracer.root, graph)


class _ShapeRecorder(torch.fx.Interpreter):
    """Runs the traced module once, storing each node's output in ``node.meta['value']``.

    A :class:`~mpbackprop.compiler.tracecheck.MutationWatch` runs alongside and refuses reads of tensors
    that an in-place operation changed after they were computed.
    """

    def __init__(self, module: torch.fx.GraphModule, describe: Callable[[torch.fx.Node], str]) -> None:
        super().__init__(module)
        self.extra_traceback = False  # keep our one-line ShapeError message as it is
        self.watch = MutationWatch(describe)

    def run_node(self, n: torch.fx.Node) -> Any:
        self.watch.before(n)
        try:
            result = super().run_node(n)
        except Exception as exc:  # noqa: BLE001
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ShapeError(f"{_where(n, self.module)}: {msg}") from exc
        n.meta["value"] = result
        self.watch.after(n, result)
        return result


class _Builder:
    def __init__(self, gm: torch.fx.GraphModule, root: nn.Module, wrapped: bool = False) -> None:
        self.wrapped = wrapped  # root is nn.Sequential(model): module paths lose the leading '0'
        self.gm = gm
        self.root = root
        self.layers: list[Layer] = []
        self.edges: list[LayerEdges | None] = []
        self.values: list[Tensor] = []
        self.num_neurons = 0
        self.num_params = 0
        self.env: dict[torch.fx.Node, Any] = {}
        self.seen_params: dict[int, str] = {}  # id(parameter) -> module path that used it
        self.block_nodes: list[str] = []  # per block: the traced node whose value is the block's a

    def path(self, target: str) -> str:
        """Module path in the user's model (undoing the wrapper of a bare layer)."""
        if not self.wrapped:
            return target
        return "" if target == "0" else target[2:]

    # ----------------------------------------------------------------- helpers
    def where(self, node: torch.fx.Node) -> str:
        """Where ``node`` is, for messages: module path and class, or ``file:line``."""
        return _where(node, self.root)

    def _refuse(self, node: torch.fx.Node, why: str = "") -> UnsupportedOpError:
        what = _describe(node, self.root)
        extra = f" ({why})" if why else ""
        return UnsupportedOpError(
            f"unsupported operation {what}{extra} in {_where(node, self.root)}; mpbackprop compiles {SUPPORTED}"
        )

    def _out_shape(self, node: torch.fx.Node) -> tuple[int, ...]:
        value = node.meta.get("value")
        if not isinstance(value, Tensor):
            raise self._refuse(node, "does not return a tensor")
        return tuple(value.shape[1:])

    def _ref(self, node: torch.fx.Node, arg: Any) -> _Ref:
        if isinstance(arg, torch.fx.Node) and isinstance(self.env.get(arg), _Ref):
            return self.env[arg]
        raise self._refuse(node, "an input is not a tensor computed from the network input")

    def _new_block(
        self,
        node: torch.fx.Node,
        kind: str,
        inputs: list[_Ref],
        edges: LayerEdges | None,
        config: dict[str, Any],
        module: nn.Module | None = None,
        name: str | None = None,
    ) -> _Ref:
        shape = self._out_shape(node)
        size = math.prod(shape)
        index = len(self.layers)
        layer = Layer(
            index=index,
            kind=kind,
            name=name or node.name,
            source=_where(node, self.root),
            shape=shape,
            offset=self.num_neurons,
            size=size,
            inputs=[r.block for r in inputs],
            input_shapes=[r.shape for r in inputs],
            config=config,
        )
        if module is not None:
            for role in ("weight", "bias"):
                p = getattr(module, role, None)
                if p is None:
                    continue
                if id(p) in self.seen_params:
                    raise self._refuse(
                        node, f"its {role} is already used by '{self.seen_params[id(p)]}': a module called more "
                        "than once or tied weights would need one param node per use")
                if module._parameters.get(role) is not p:
                    raise self._refuse(
                        node, f"its {role} is computed from other tensors (weight_norm, a parametrization, ...), "
                        "not an nn.Parameter of its own; remove the reparametrization")
                self.seen_params[id(p)] = str(node.target)
                pt = ParamTensor(self.path(str(node.target)), role, tuple(p.shape), self.num_params, role,
                                 frozen=not p.requires_grad)
                self.num_params += pt.numel
                self.values.append(p.detach().reshape(-1))
                setattr(layer, role, pt)
        self.layers.append(layer)
        self.edges.append(edges)
        self.block_nodes.append(node.name)
        self.num_neurons += size
        return _Ref(index, shape, fresh=kind != "input")

    def _fixed(self, node: torch.fx.Node, kind: str, terms: list[tuple[_Ref, float]], config: dict) -> _Ref:
        shape = self._out_shape(node)
        size = math.prod(shape)
        for ref, _ in terms:
            if math.prod(ref.shape) != size:
                raise self._refuse(node, f"operands of shapes {ref.shape} and {shape} need broadcasting")
        srcs, dsts, coefs = [], [], []
        base = 0
        for ref, c in terms:
            srcs.append(torch.arange(size) + base)
            dsts.append(torch.arange(size))
            coefs.append(torch.full((size,), float(c), dtype=torch.float64))
            base += size
        config = dict(config, coefs=[float(c) for _, c in terms])
        edges = LayerEdges(torch.cat(srcs), torch.cat(dsts), coef=torch.cat(coefs))
        return self._new_block(node, kind, [r for r, _ in terms], edges, config)

    # --------------------------------------------------------------- operations
    def _activation(self, node: torch.fx.Node, act: Activation, arg: Any) -> _Ref:
        ref = self._ref(node, arg)
        src_node = arg
        layer = self.layers[ref.block]
        if ref.fresh and layer.activation.is_identity and len(src_node.users) == 1:
            layer.activation = act
            self.block_nodes[ref.block] = node.name
            return _Ref(ref.block, ref.shape, fresh=False)
        # values already activated, or also used raw: a block of its own, joined by identity edges
        out = self._fixed(node, "act", [(ref, 1.0)], {})
        self.layers[out.block].activation = act
        return _Ref(out.block, out.shape, fresh=False)

    def _reshape(self, node: torch.fx.Node) -> _Ref:
        ref = self._ref(node, node.args[0])
        shape = self._out_shape(node)
        if math.prod(shape) != math.prod(ref.shape):
            raise self._refuse(node, "reshape that mixes the batch axis")
        fresh = ref.fresh and len(node.args[0].users) == 1
        return _Ref(ref.block, shape, fresh)

    def _arith(self, node: torch.fx.Node) -> _Ref:
        t = node.target
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
        a_is_t = isinstance(self.env.get(a), _Ref)
        b_is_t = isinstance(self.env.get(b), _Ref)
        if t in _ADD_FUNCS or t in _SUB_FUNCS:
            if not (a_is_t and b_is_t):
                raise self._refuse(node, "adding a constant; biases must come from Linear/Conv2d layers")
            sign = -1.0 if t in _SUB_FUNCS else 1.0
            alpha = float(node.kwargs.get("alpha", 1.0))
            return self._fixed(node, "add", [(self.env[a], 1.0), (self.env[b], sign * alpha)], {})
        if t in _MUL_FUNCS or t in _DIV_FUNCS:
            if a_is_t and b_is_t:
                raise self._refuse(node, "product of two tensors")
            ref, c = (self.env[a], b) if a_is_t else (self.env.get(b), a)
            if not isinstance(c, (int, float)) or isinstance(c, bool) or not isinstance(ref, _Ref):
                raise self._refuse(node, "scaling by something other than a Python number")
            if t in _DIV_FUNCS:
                if not a_is_t:
                    raise self._refuse(node, "dividing a number by a tensor")
                c = 1.0 / c
            return self._fixed(node, "scale", [(ref, float(c))], {"scale": float(c)})
        raise self._refuse(node)

    # --------------------------------------------------------------------- walk
    def run(self) -> Trace:
        _check_single_input(self.gm, self.root)
        output_ref: _Ref | None = None
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self._new_block(node, "input", [], None, {}, name="input")
                self.layers[0].source = "network input"
            elif node.op == "output":
                out = node.args[0]
                if not (isinstance(out, torch.fx.Node) and isinstance(self.env.get(out), _Ref)):
                    raise UnsupportedOpError(
                        "forward must return a single tensor computed from the input; "
                        "tuples, dicts and constants are not supported"
                    )
                output_ref = self.env[out]
            else:
                self.env[node] = self._visit(node)
        assert output_ref is not None
        if output_ref.block == 0:
            raise UnsupportedOpError("the network has no layer: its output is its input")
        if self.num_params == 0:
            raise UnsupportedOpError(
                f"{type(self.root[0] if self.wrapped else self.root).__name__} has no parameters to train "
                "(no Linear or Conv2d layer in its forward); mpbackprop compiles networks with at least one"
            )
        values = torch.cat(self.values)
        return Trace(self.layers, self.edges, values, self.layers[0].shape, output_ref.block, output_ref.shape,
                     self.gm, self.block_nodes)

    def _visit(self, node: torch.fx.Node) -> Any:
        if node.op == "get_attr":
            raise self._refuse(node, "tensors used directly in forward; wrap weights in nn.Linear/nn.Conv2d")
        if node.op == "call_module":
            mod = self.root.get_submodule(str(node.target))
            kind = _kinds.for_module(mod)
            if kind is not None:
                return kind.trace(self, node, mod)
            if type(mod) in _MODULE_ACTS:
                return self._activation(node, _MODULE_ACTS[type(mod)](mod), node.args[0])
            if isinstance(mod, (nn.Identity, nn.Flatten)):  # re-indexings: same freshness rule
                return self._reshape(node)
            raise self._refuse(node)
        if node.op == "call_function":
            act = _function_act(node)
            if act is not None:
                return self._activation(node, act, node.args[0])
            t = node.target
            if t in _RESHAPE_FUNCS:
                return self._reshape(node)
            kind = _kinds.for_function(t)
            if kind is not None:
                return kind.trace(self, node, None)
            if t in _ADD_FUNCS + _SUB_FUNCS + _MUL_FUNCS + _DIV_FUNCS:
                return self._arith(node)
            if t is operator.neg or t is torch.neg:
                return self._fixed(node, "scale", [(self._ref(node, node.args[0]), -1.0)], {"scale": -1.0})
            if t is operator.getitem and not isinstance(self.env.get(node.args[0]), _Ref):
                return node.meta.get("value")  # indexing a shape tuple: x.shape[0]
            if t is getattr and not isinstance(self.env.get(node.args[0]), _Ref):
                return node.meta.get("value")
            if t is getattr and node.args[1] == "shape":
                return node.meta.get("value")
            raise self._refuse(node)
        if node.op == "call_method":
            m = node.target
            if m in _METHOD_ACTS:
                return self._activation(node, Activation(_METHOD_ACTS[m]), node.args[0])
            if m in _RESHAPE_METHODS:
                return self._reshape(node)
            if m in ("size", "dim"):
                return node.meta.get("value")
            kind = _kinds.for_method(m)
            if kind is not None:
                return kind.trace(self, node, None)
            if m in _ARITH_METHODS:  # in-place forms are safe here: the shape pass refused stale reads
                node_t = _ARITH_METHODS[m]
                fake = _FakeNode(node, node_t)
                return self._arith(fake)  # type: ignore[arg-type]
            raise self._refuse(node)
        raise self._refuse(node)  # pragma: no cover


class _FakeNode:
    """A call_method node seen as the equivalent call_function (``x.add(y)`` → ``operator.add``)."""

    def __init__(self, node: torch.fx.Node, target: Callable) -> None:
        self._node = node
        self.target = target

    def __getattr__(self, item: str) -> Any:
        return getattr(self._node, item)


def _node_kind(node: torch.fx.Node, root: nn.Module) -> "_kinds.Kind | None":
    """The registered kind that traces ``node``, if any."""
    if node.op == "call_module":
        return _kinds.for_module(root.get_submodule(str(node.target)))
    if node.op == "call_function":
        return _kinds.for_function(node.target)
    if node.op == "call_method":
        return _kinds.for_method(str(node.target))
    return None


def _check_single_input(gm: torch.fx.GraphModule, root: nn.Module) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedOpError(
            f"forward of {type(root).__name__} takes {len(placeholders)} tensor arguments; "
            "mpbackprop compiles networks with exactly one input"
        )




def check_input_shape(shape: Any) -> tuple[int, ...]:
    """``shape`` as a per-sample input shape: a sequence (tuple, list, ``torch.Size``) of positive ints.

    Raises
    ------
    ShapeError
        ``shape`` is a mapping, a set, a string or anything else that is not such a sequence.
    """
    example = "a tuple of positive ints per sample, without the batch axis, e.g. (1, 8, 8)"
    if not isinstance(shape, (tuple, list, torch.Size)):
        raise ShapeError(f"input shape {_short_repr(shape)} is a {type(shape).__name__}, not a shape: give {example}")
    out = []
    for s in shape:
        if isinstance(s, bool) or not hasattr(s, "__index__"):
            raise ShapeError(f"input shape {_short_repr(shape)} is not a shape: give {example}")
        out.append(int(s.__index__()))
    if not out:
        raise ShapeError(f"input shape () is empty: give {example}")
    if any(s <= 0 for s in out):
        raise ShapeError(f"input shape {tuple(out)} has a non-positive dimension")
    return tuple(out)


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _output_shape(gm: torch.fx.GraphModule) -> tuple[int, ...] | None:
    """Per-sample shape of the tensor ``gm`` returns (from the shape pass), or None."""
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    value = out_node.args[0].meta.get("value") if isinstance(out_node.args[0], torch.fx.Node) else None
    return tuple(value.shape[1:]) if isinstance(value, Tensor) and value.dim() >= 1 else None


def _has_spatial_ops(gm: torch.fx.GraphModule, root: nn.Module) -> bool:
    """Whether any operation reads the leading per-sample axis as channels (Conv2d, pooling)."""
    for node in gm.graph.nodes:
        kind = _node_kind(node, root)
        if kind is not None and kind.spatial:
            return True
    return False


def _check_output_shape(gm: torch.fx.GraphModule, root: nn.Module, input_shape: tuple[int, ...]) -> None:
    """Refuse a network whose output per sample has more than one axis.

    Losses take one vector of class scores (or regression targets) per sample. An output with
    more axes is most often an input shape that includes the batch axis: a ``Linear`` maps any
    leading axes through unchanged, so ``(32, 64)`` into a 64-10 MLP gives ``(32, 10)`` per sample.
    """
    out = _output_shape(gm)
    if out is None or len(out) <= 1:
        return
    rule = ("the input shape (INPUT_SHAPE) is per sample, without the batch axis, and the network must return "
            "one vector of class scores or targets per sample")
    if len(input_shape) > 1 and out[0] == input_shape[0] and not _has_spatial_ops(gm, root):
        raise ShapeError(
            f"the network's output for one sample has shape {out}, not a vector: the leading axis of the input "
            f"shape {input_shape} reaches the output unchanged, as a batch axis would; {rule}: use "
            f"{input_shape[1:]} if {input_shape[0]} is the batch size, or end the network with nn.Flatten()"
        )
    raise ShapeError(f"the network's output for one sample has shape {out}, not a vector: {rule} "
                     "(end the network with nn.Flatten() or a Linear layer)")


def trace_module(model: nn.Module, input_shape: tuple[int, ...]) -> Trace:
    """Trace ``model`` on inputs of per-sample shape ``input_shape`` into blocks and edges.

    Before any edge is built the traced graph is checked: operations whose gradient the graph
    would not reproduce (:mod:`mpbackprop.compiler.tracecheck`) are refused, the output must be a vector
    per sample, and the graph's estimated memory must fit the limit (:mod:`mpbackprop.compiler.budget`).

    Raises
    ------
    UnsupportedOpError
        An operation the graph cannot express, naming it and where it is.
    ShapeError
        ``input_shape`` is not a per-sample shape or does not fit the network.
    GraphTooLargeError
        The graph would take more memory than ``MPBACKPROP_MAX_GRAPH_GB``.
    """
    if not isinstance(model, nn.Module):
        raise UnsupportedOpError(f"expected a torch.nn.Module, got {type(model).__name__}")
    input_shape = check_input_shape(input_shape)
    wrapped = _kinds.for_module(model) is not None or type(model) in _MODULE_ACTS
    if wrapped:  # torch.fx cannot trace a leaf module as the root: trace nn.Sequential(model)
        model = nn.Sequential(model)
    inference_mode = torch.is_inference_mode_enabled()
    gm = symbolic_trace(model)
    _check_single_input(gm, model)
    builder = _Builder(gm, model, wrapped)

    def describe(node: torch.fx.Node) -> str:
        return f"{_describe(node, model)} in {_where(node, model)}"

    check_autograd_semantics(gm, model, describe, builder.path, inference_mode)
    # refuse unsupported operations before running anything
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = model.get_submodule(str(node.target))
            ok = (_kinds.for_module(mod) is not None or isinstance(mod, (nn.Identity, nn.Flatten))
                  or type(mod) in _MODULE_ACTS)
            if not ok:
                raise builder._refuse(node)
    param = next(iter(model.parameters()), None)
    dtype = param.dtype if param is not None else torch.float32
    example = torch.zeros((2, *input_shape), dtype=dtype)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad():
            _ShapeRecorder(gm, describe).run(example)
    finally:  # the shape pass leaves the module as it was (BatchNorm in training mode updates its statistics)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])
    try:
        check_budget(estimate(gm, model), type(model[0] if wrapped else model).__name__)
    except GraphTooLargeError:
        _check_output_shape(gm, model, input_shape)  # a batch axis in the input shape is the likelier mistake
        raise
    trace = builder.run()
    _check_output_shape(gm, model, input_shape)
    return trace
