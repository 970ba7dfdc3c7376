"""The memory a compiled graph will take, estimated before it is built, and the limit on it.

A graph holds one ``param`` node per scalar parameter and one edge per weight *use* (four
relations per use: ``in_L``, ``out_L`` and their reverses, plus the per-layer views the engine
builds), so its size grows with ``uses ≈ parameters × output positions``: a 50M-parameter MLP
would need about 9.5 GB. :func:`estimate` counts neurons, parameters, uses and fixed edges from
the shapes the compiler's shape pass recorded, before any edge exists; :func:`check_budget`
refuses a graph over the limit, ``MPBACKPROP_MAX_GRAPH_GB`` gigabytes (default
:data:`DEFAULT_LIMIT_GB`).

The bytes per item are measured peaks of ``mpbackprop.compile`` plus the views, rounded up:
784-H-H-10 MLPs took 145–175 bytes per weight (H = 512 … 2048); the estimate gives 190.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch.fx
import torch.nn as nn
from torch import Tensor

from ..errors import MPBackpropError
from ..kinds import Kind, for_function, for_method, for_module

__all__ = ["ENV_VAR", "DEFAULT_LIMIT_GB", "GraphEstimate", "GraphTooLargeError", "check_budget", "estimate",
           "limit_gb"]

#: Environment variable that sets the limit, in gigabytes (10⁹ bytes).
ENV_VAR = "MPBACKPROP_MAX_GRAPH_GB"
#: Default limit: room for a 784-512-512-10 MLP (about 0.14 GB) many times over, but not for a
#: network whose graph would not fit a laptop's memory.
DEFAULT_LIMIT_GB = 2.0

BYTES_PER_USE = 150  # 4 relations × (src, dst), 3 view blocks, the use→param index, build temporaries
BYTES_PER_FIXED_EDGE = 150  # fixed_L + reverse, coefficients, 2 view blocks
BYTES_PER_BIAS_EDGE = 100
BYTES_PER_NEURON = 100  # 9 int64 features, per-layer index maps
BYTES_PER_PARAM = 40  # value + 8 int64 features, less what the use estimate already covers


class GraphTooLargeError(MPBackpropError):
    """The compiled graph would take more memory than the limit (or the limit is malformed)."""


@dataclass
class GraphEstimate:
    """Upper-bound counts of what a compiled graph will hold."""

    neurons: int = 0
    params: int = 0
    uses: int = 0
    bias_edges: int = 0
    fixed_edges: int = 0

    @property
    def bytes(self) -> int:
        return (self.uses * BYTES_PER_USE + self.fixed_edges * BYTES_PER_FIXED_EDGE
                + self.bias_edges * BYTES_PER_BIAS_EDGE + self.neurons * BYTES_PER_NEURON
                + self.params * BYTES_PER_PARAM)

    @property
    def gb(self) -> float:
        return self.bytes / 1e9


def _per_sample(value: object) -> int:
    return math.prod(value.shape[1:]) if isinstance(value, Tensor) and value.dim() >= 1 else 0


def _kind_of(node: torch.fx.Node, mod: nn.Module | None) -> Kind | None:
    if mod is not None:
        return for_module(mod)
    if node.op == "call_function":
        return for_function(node.target)
    if node.op == "call_method":
        return for_method(str(node.target))
    return None


def estimate(gm: torch.fx.GraphModule, root: nn.Module) -> GraphEstimate:
    """Count what compiling ``gm`` will create, from the per-node values in ``node.meta['value']``.

    Each node a registered kind traces counts what the kind says (:meth:`~mpbackprop.kinds.Kind.estimate`:
    uses exactly for ``Linear``, an upper bound for ``Conv2d`` whose taps in the zero padding have no
    use, window edges for pooling); every other tensor-valued node counts as a block of fixed edges, one
    per element and tensor input (an upper bound: re-indexings and folded activations create none).
    """
    est = GraphEstimate(params=sum(p.numel() for p in root.parameters()))
    for node in gm.graph.nodes:
        value = node.meta.get("value")
        size = _per_sample(value)
        if node.op == "placeholder":
            est.neurons += size
            continue
        if node.op == "output" or not isinstance(value, Tensor):
            continue
        est.neurons += size
        mod = root.get_submodule(str(node.target)) if node.op == "call_module" else None
        inputs = sum(isinstance(a.meta.get("value"), Tensor) for a in node.all_input_nodes)
        kind = _kind_of(node, mod)
        uses, bias, fixed = kind.estimate(node, mod, size, inputs) if kind is not None else (0, 0, size * max(inputs, 1))
        est.uses += uses
        est.bias_edges += bias
        est.fixed_edges += fixed
    return est


def limit_gb() -> float:
    """The limit in gigabytes: ``MPBACKPROP_MAX_GRAPH_GB`` if set, else :data:`DEFAULT_LIMIT_GB`."""
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw.strip() == "":
        return DEFAULT_LIMIT_GB
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value) or value <= 0:
        raise GraphTooLargeError(f"{ENV_VAR}={raw!r} is not a positive number of gigabytes; set it like "
                                 f"{ENV_VAR}=8 or unset it (default {DEFAULT_LIMIT_GB:g})")
    return value


def check_budget(est: GraphEstimate, what: str) -> None:
    """Raise :class:`GraphTooLargeError` when ``est`` is over the limit, before anything is built."""
    limit = limit_gb()
    if est.gb <= limit:
        return
    need = max(math.ceil(est.gb * 1.25), 1)
    raise GraphTooLargeError(
        f"compiling {what} would take about {est.gb:.1f} GB of memory ({est.params:,} parameters, "
        f"{est.uses:,} weight uses, {est.neurons:,} neurons), more than the limit of {limit:g} GB; "
        f"compile a smaller network, or raise the limit with {ENV_VAR}={need} if the machine has the memory"
    )
