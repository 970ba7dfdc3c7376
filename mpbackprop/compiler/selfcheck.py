"""The compiler's safety net: the compiled forward pass must equal the module's on a random input.

:func:`check_forward` runs once per :func:`mpbackprop.compile`. The static checks of the
compiler and :mod:`mpbackprop.compiler.tracecheck` refuse everything known to make the graph differ from
the module; this catches what they do not know about (a forward hook that changes an output, an
operation whose traced form differs from what it runs). It draws a batch of two samples from a
private generator (the global RNG is not touched), runs the module with its parameters and
buffers cast to float64 through :func:`torch.func.functional_call` (the module's own tensors are
not touched either; a module that cannot run in float64 runs in its own dtype) and the compiled
network on the same values, and refuses when they differ by more than the dtype's tolerance,
naming the first block whose values differ and by how much.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
import torch.nn as nn
from torch import Tensor

from ..errors import UnsupportedOpError
from ..kinds import compiled_modes

__all__ = ["ForwardMismatchError", "check_forward", "TOLERANCE"]

#: Allowed ``max |compiled − module|`` relative to ``1 + max |module|``, per dtype.
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
_SEED = 20240611
_BATCH = 2


class ForwardMismatchError(UnsupportedOpError):
    """The compiled network's forward pass does not compute what the module computes."""


class _Recorder(torch.fx.Interpreter):
    """Runs a traced module, keeping a copy of every tensor value as it was when computed."""

    def __init__(self, module: torch.fx.GraphModule) -> None:
        super().__init__(module)
        self.values: dict[str, Tensor] = {}

    def run_node(self, n: torch.fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.values[n.name] = result.detach().clone()
        return result


class _RecordingModule(nn.Module):
    """``gm`` run by :class:`_Recorder`, as a module (so ``functional_call`` can swap its tensors)."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm
        self.values: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Any:
        rec = _Recorder(self.gm)
        out = rec.run(x)
        self.values = rec.values
        return out


def _tensors(module: nn.Module, dtype: torch.dtype, prefix: str = "") -> dict[str, Tensor]:
    named = dict(module.named_parameters(remove_duplicate=False))
    named.update(dict(module.named_buffers(remove_duplicate=False)))
    # copies, integer buffers too: a module that updates buffers in place (BatchNorm's counters) changes these
    return {prefix + k: (v.detach().to(dtype) if v.is_floating_point() else v.detach().clone())
            for k, v in named.items()}


def _run(module: nn.Module, tensors: dict[str, Tensor], x: Tensor) -> Any:
    """``module(x)`` with ``tensors`` swapped in (buffer updates, e.g. BatchNorm's running statistics, land on
    the copies), in the modes the compiled blocks compute (:func:`~mpbackprop.kinds.compiled_modes`)."""
    with torch.random.fork_rng(devices=[]), torch.no_grad(), compiled_modes(module):
        return torch.func.functional_call(module, tensors, (x.clone(),), strict=False)


def _dtype_of(model: nn.Module) -> torch.dtype:
    param = next(iter(model.parameters()), None)
    return param.dtype if param is not None else torch.float32


def _differs(got: Tensor, want: Tensor, tol: float) -> float | None:
    """Max absolute difference if it is over ``tol·(1 + max|want|)`` (NaN where both are NaN is equal)."""
    if got.shape != want.shape:
        return float("inf")
    diff = (got - want).abs()
    both_nan = got.isnan() & want.isnan()
    same_inf = (got == want)
    diff = torch.where(both_nan | same_inf, torch.zeros_like(diff), diff)
    finite = want[torch.isfinite(want)]
    scale = 1.0 + (float(finite.abs().max()) if finite.numel() else 0.0)
    worst = float(diff.max()) if diff.numel() else 0.0
    if worst != worst:  # NaN on one side only
        return float("nan")
    return worst if worst > tol * scale else None


def check_forward(model: nn.Module, net: Any, gm: torch.fx.GraphModule | None = None,
                  block_nodes: list[str] | None = None) -> None:
    """Raise :class:`ForwardMismatchError` unless ``net.forward`` equals ``model`` on a random batch.

    ``gm`` (the trace the network was compiled from, rooted at ``model`` or at
    ``nn.Sequential(model)``) and ``block_nodes`` (per block, the traced node holding its values)
    let the error name the first block that differs.
    """
    gen = torch.Generator().manual_seed(_SEED)
    dtype = torch.float64
    x = torch.randn((_BATCH, *net.input_shape), generator=gen, dtype=dtype)
    try:
        want = _run(model, _tensors(model, dtype), x)
    except Exception:  # noqa: BLE001 - e.g. a forward that builds float32 constants: run as it is
        dtype = _dtype_of(model)
        x = x.to(dtype)
        want = _run(model, _tensors(model, dtype), x)
    if not isinstance(want, Tensor):
        return  # compile refused anything else before this point
    theta = net.values.detach().to(dtype)
    with torch.no_grad():
        record = net.forward(x, theta, record=True)
    tol = TOLERANCE.get(dtype, 1e-2)
    worst = _differs(record.output, want.reshape(record.output.shape) if want.numel() == record.output.numel()
                     else want, tol)
    if worst is None:
        return
    block = _first_differing_block(net, record, x, dtype, tol, gm, block_nodes)
    layer = net.layers[block if block is not None else net.output_layer]
    where = f"block {layer.index} ({layer.kind} '{layer.name}', {layer.source})"
    first = "first differs at" if block is not None else "differs at the output,"
    raise ForwardMismatchError(
        f"the compiled network does not compute what the module computes: on a random input ({dtype}) it "
        f"{first} {where}, max difference {worst:.3g}; the module does something the trace does not show "
        "(a forward hook, an operation that depends on more than its inputs, ...): remove it, or report the "
        "model as a compiler bug"
    )


def _first_differing_block(net: Any, record: Any, x: Tensor, dtype: torch.dtype, tol: float,
                           gm: torch.fx.GraphModule | None, block_nodes: list[str] | None) -> int | None:
    """Index of the first block whose compiled values differ from the traced module's, if any."""
    if gm is None or not block_nodes:
        return None
    runner = _RecordingModule(gm)
    try:
        _run(runner, _tensors(gm, dtype, prefix="gm."), x)
    except Exception:  # noqa: BLE001 - locating is best effort; the mismatch itself is certain
        return None
    batch = x.shape[0]
    for layer, name in zip(net.layers, block_nodes):
        value = runner.values.get(name)
        if value is None or value.numel() != record.a[layer.index].numel():
            continue
        if _differs(record.a[layer.index], value.reshape(batch, -1), tol) is not None:
            return layer.index
    return None
