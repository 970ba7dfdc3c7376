"""Fixed linear combinations of whole blocks: residual ``+``/``-`` (``add``), scaling by a constant
(``scale``) and a second activation on values already activated or also used raw (``act``, identity
edges). The compiler's arithmetic and activation handling creates them; each edge carries its constant."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .base import FixedKind, ForwardContext

__all__ = ["Add", "Scale", "Act", "Input"]


class _Combination(FixedKind):
    def forward(self, layer: Any, inputs: list[Tensor], w: Tensor | None, b: Tensor | None,
                ctx: ForwardContext) -> Tensor:
        coefs = layer.config["coefs"]
        out = inputs[0] * coefs[0]
        for x, c in zip(inputs[1:], coefs[1:]):
            out = out + x * c
        return out


class Add(_Combination):
    """``a + b``, ``a - b``, ``torch.add(a, b, alpha=…)``: one edge per element and operand."""

    name = "add"
    id = 4
    colour = "#8172b3"
    supported = "residual +/-"


class Scale(_Combination):
    """``c·a``, ``a / c``, ``-a`` for a Python number ``c``."""

    name = "scale"
    id = 5
    colour = "#da8bc3"
    supported = "scaling by a constant"


class Act(_Combination):
    """An activation block of its own, joined to its input by identity edges."""

    name = "act"
    id = 6
    colour = "#64b5cd"


class Input(FixedKind):
    """Block 0: the network input (no edges, never run)."""

    name = "input"
    id = 0
    colour = "#9e9e9e"
