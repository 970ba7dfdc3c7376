"""The registry of layer kinds: one module per kind (method.md §1; :mod:`mpbackprop.kinds.base` says
what a kind provides). The compiler, the network's forward passes, the engine, the graph budget and the
pictures read it. Adding a kind is adding one module to this package: every concrete
:class:`~mpbackprop.kinds.base.Kind` subclass defined in a module here is found and registered.

Each kind states its integer id (``Kind.id``, stored on ``g.nodes['neuron'].data['kind']``): existing
ids never move, a new kind takes the next free one (the ids must run 0, 1, 2, ... without gaps).
"""

from __future__ import annotations

from typing import Any

import contextlib
import importlib
import pkgutil
from typing import Any, Iterator

from .base import (DIAGONAL, FULL, SCALAR, BlockGrad, BlockInput, Coefficients, FixedKind, ForwardContext, Kind,
                   LayerEdges, WeightedKind, select_kernel)

__all__ = ["REGISTRY", "KIND_NAMES", "get", "for_module", "for_function", "for_method", "supported_text",
           "compiled_modes",
           "Kind", "WeightedKind", "FixedKind", "Coefficients", "BlockInput", "BlockGrad", "ForwardContext",
           "LayerEdges", "select_kernel", "SCALAR", "DIAGONAL", "FULL"]

#: name → kind, in id order.
REGISTRY: dict[str, Kind] = {}


def _discover() -> list[Kind]:
    """One instance of every concrete kind defined in this package's modules, in id order."""
    found: dict[str, Kind] = {}
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for obj in vars(module).values():
            if (isinstance(obj, type) and issubclass(obj, Kind) and obj.__module__ == module.__name__
                    and obj.name and not obj.__name__.startswith("_")):
                found[obj.name] = obj()
    kinds = sorted(found.values(), key=lambda k: k.id)
    ids = [k.id for k in kinds]
    if ids != list(range(len(kinds))):
        raise RuntimeError(f"layer kind ids must run 0..{len(kinds) - 1} without repeats, got "
                           + ", ".join(f"{k.name}={k.id}" for k in kinds))
    return kinds


for _kind in _discover():
    REGISTRY[_kind.name] = _kind

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


@contextlib.contextmanager
def compiled_modes(model: Any) -> Iterator[None]:
    """Within the block, every submodule of ``model`` whose kind computes in one mode only
    (:attr:`Kind.module_training`) is in that mode; the flags are restored afterwards."""
    saved = []
    for mod in model.modules():
        kind = for_module(mod)
        if kind is not None and kind.module_training is not None and mod.training != kind.module_training:
            saved.append((mod, mod.training))
            mod.training = kind.module_training
    try:
        yield
    finally:
        for mod, flag in saved:
            mod.training = flag


def supported_text() -> tuple[str, str]:
    """How the supported-operations line names the layer kinds: ``(layers, combinations)``."""
    weighted = [k.supported for k in REGISTRY.values() if k.supported and k.modules and k.weighted]
    fixed = [k.supported for k in REGISTRY.values() if k.supported and k.modules and not k.weighted]
    other = [k.supported for k in REGISTRY.values() if k.supported and not k.modules]
    return ", ".join(weighted + fixed), ", ".join(other)
