"""Layer metadata of a compiled network.

A compiled network is a list of neuron *blocks* (method.md §1): block 0 holds the
input units, every later block the output units of one operation. Each block
knows which earlier blocks it reads, how it reads them (the per-sample view
shape, because flatten/view/reshape are re-indexings and create no neurons), its
activation, and the parameter tensors it owns. These dataclasses are plain data:
they serialise to JSON next to the DGL graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .activations import IDENTITY, Activation
from ..kinds import KIND_NAMES, REGISTRY

__all__ = ["ParamTensor", "Layer", "KINDS", "WEIGHTED_KINDS", "FIXED_KINDS"]

#: Every layer kind, in the order of their integer ids on ``g.nodes['neuron'].data['kind']`` (the registry's).
KINDS: tuple[str, ...] = KIND_NAMES
#: Kinds whose uses carry a learned weight (edge types ``in_L``/``out_L``).
WEIGHTED_KINDS = frozenset(k.name for k in REGISTRY.values() if k.weighted)
#: Kinds with fixed-coefficient neuron→neuron edges (edge type ``fixed_L``).
FIXED_KINDS = frozenset(k.name for k in REGISTRY.values() if not k.weighted and k.name != "input")


@dataclass
class ParamTensor:
    """One parameter tensor of the module, laid out as consecutive ``param`` nodes.

    Parameter node ``offset + k`` is element ``k`` of ``module.get_parameter(path).flatten()``.
    ``frozen`` tensors (``requires_grad=False`` in the module) are never changed by training.
    """

    module: str
    name: str
    shape: tuple[int, ...]
    offset: int
    role: str  # "weight" or "bias"
    frozen: bool = False

    @property
    def path(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def stop(self) -> int:
        return self.offset + self.numel

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "ParamTensor":
        return cls(d["module"], d["name"], tuple(d["shape"]), int(d["offset"]), d["role"], bool(d.get("frozen", False)))


@dataclass
class Layer:
    """A block of neurons: the output units of one operation (or the input).

    Attributes
    ----------
    index : int
        Block index; ``g.nodes['neuron'].data['layer']`` holds it. Block 0 is the input.
    kind : str
        One of :data:`KINDS`.
    name : str
        Module path (``"features.0"``) or traced node name (``"add"``).
    source : str
        Where it comes from, for messages: module path and class, or ``file:line``.
    shape : tuple of int
        Per-sample output shape, e.g. ``(16, 4, 4)``; neurons are numbered row-major.
    offset, size : int
        The block's neurons are node ids ``offset .. offset+size-1``.
    inputs : list of int
        Source blocks, in order.
    input_shapes : list of tuple
        The per-sample view shape in which each source is read.
    activation : Activation
        ``a = f(z)`` for every neuron of the block.
    weight, bias : ParamTensor or None
        Parameters owned by the block (weighted kinds).
    config : dict
        Operation hyper-parameters (stride, padding, dilation, kernel, coefficients, ...).
    """

    index: int
    kind: str
    name: str
    source: str
    shape: tuple[int, ...]
    offset: int
    size: int
    inputs: list[int] = field(default_factory=list)
    input_shapes: list[tuple[int, ...]] = field(default_factory=list)
    activation: Activation = IDENTITY
    weight: ParamTensor | None = None
    bias: ParamTensor | None = None
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def stop(self) -> int:
        return self.offset + self.size

    @property
    def weighted(self) -> bool:
        return self.kind in WEIGHTED_KINDS

    @property
    def params(self) -> list[ParamTensor]:
        return [p for p in (self.weight, self.bias) if p is not None]

    @property
    def num_params(self) -> int:
        return sum(p.numel for p in self.params)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "kind": self.kind,
            "name": self.name,
            "source": self.source,
            "shape": list(self.shape),
            "offset": self.offset,
            "size": self.size,
            "inputs": list(self.inputs),
            "input_shapes": [list(s) for s in self.input_shapes],
            "activation": self.activation.to_json(),
            "weight": self.weight.to_json() if self.weight else None,
            "bias": self.bias.to_json() if self.bias else None,
            "config": self.config,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "Layer":
        return cls(
            index=int(d["index"]),
            kind=d["kind"],
            name=d["name"],
            source=d["source"],
            shape=tuple(d["shape"]),
            offset=int(d["offset"]),
            size=int(d["size"]),
            inputs=[int(i) for i in d["inputs"]],
            input_shapes=[tuple(s) for s in d["input_shapes"]],
            activation=Activation.from_json(d["activation"]),
            weight=ParamTensor.from_json(d["weight"]) if d.get("weight") else None,
            bias=ParamTensor.from_json(d["bias"]) if d.get("bias") else None,
            config=dict(d.get("config", {})),
        )
