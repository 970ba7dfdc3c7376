"""The registry of layer kinds: one module per kind (method.md §1; :mod:`mpbackprop.kinds.base` says
what a kind provides). The compiler, the network's forward passes, the engine, the graph budget and the
pictures read it; adding a kind is one new module registered here.

Registration order fixes the integer ids on ``g.nodes['neuron'].data['kind']``: existing ids never move,
new kinds are appended.
"""

from __future__ import annotations

from typing import Any

from .avgpool2d import AvgPool2d
from .base import (DIAGONAL, FULL, SCALAR, BlockGrad, BlockInput, Coefficients, FixedKind, ForwardContext, Kind,
                   LayerEdges, WeightedKind, select_kernel)
from .combine import Act, Add, Input, Scale
from .conv2d import Conv2d
from .linear import Linear

__all__ = ["REGISTRY", "KIND_NAMES", "get", "for_module", "for_function", "for_method", "supported_text",
           "Kind", "WeightedKind", "FixedKind", "Coefficients", "BlockInput", "BlockGrad", "ForwardContext",
           "LayerEdges", "select_kernel", "SCALAR", "DIAGONAL", "FULL"]

#: name → kind, in id order.
REGISTRY: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    """Add ``kind`` to the registry (its id is the next free one)."""
    if kind.name in REGISTRY:
        raise ValueError(f"layer kind {kind.name!r} is registered twice")
    REGISTRY[kind.name] = kind
    return kind


for _kind in (Input(), Linear(), Conv2d(), AvgPool2d(), Add(), Scale(), Act()):
    register(_kind)

#: Every kind's name, in id order.
KIND_NAMES: tuple[str, ...] = tuple(REGISTRY)


def get(name: str) -> Kind:
    """The kind called ``name`` (``KeyError`` names the known ones)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown layer kind {name!r}; known: {', '.join(REGISTRY)}") from None


def for_module(mod: Any) -> Kind | None:
    """The kind that traces module ``mod``, if any."""
    for kind in REGISTRY.values():
        if kind.modules and isinstance(mod, kind.modules):
            return kind
    return None


def for_function(target: Any) -> Kind | None:
    """The kind that traces calls of function ``target``, if any."""
    for kind in REGISTRY.values():
        if any(target is f for f in kind.functions):
            return kind
    return None


def for_method(name: str) -> Kind | None:
    """The kind that traces tensor method ``name`` (``x.mean(...)``), if any."""
    for kind in REGISTRY.values():
        if name in kind.methods:
            return kind
    return None


def supported_text() -> tuple[str, str]:
    """How the supported-operations line names the layer kinds: ``(layers, combinations)``."""
    weighted = [k.supported for k in REGISTRY.values() if k.supported and k.modules and k.weighted]
    fixed = [k.supported for k in REGISTRY.values() if k.supported and k.modules and not k.weighted]
    other = [k.supported for k in REGISTRY.values() if k.supported and not k.modules]
    return ", ".join(weighted + fixed), ", ".join(other)
