"""Feedback alignment (Lillicrap et al., 2016, *Random synaptic feedback weights support
error backpropagation for deep learning*): backward messages use fixed random weights
``B_p`` of the same shapes as the forward weights, ``m_k = B_p·b_j``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .base import BackwardRule, LayerContext

__all__ = ["FeedbackAlignment", "feedback_weights"]


def feedback_weights(net: Any, seed: int, scale: float = 1.0) -> dict[str, Tensor]:
    """Fixed random feedback weights per weighted layer, ``U(-s, s)`` with ``s = scale/√fan_in``.

    Seeded and independent of the global RNG: the same network and seed give the same
    feedback weights on every machine. Keys are ``"B<layer index>"``, values ``(P_w,)``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[str, Tensor] = {}
    for layer in net.layers:
        if layer.weight is None:
            continue
        shape = layer.weight.shape
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
        bound = scale / math.sqrt(fan_in)
        w = torch.rand(layer.weight.numel, generator=gen, dtype=torch.float64) * 2 - 1
        out[f"B{layer.index}"] = (w * bound).to(net.dtype)
    return out


class FeedbackAlignment(BackwardRule):
    """Feedback alignment with seeded fixed random feedback weights.

    Parameters
    ----------
    seed : int
        Seed of the feedback weights.
    scale : float
        Multiplier of the default ``1/√fan_in`` range.
    """

    name = "fa"
    state_dim = 1

    def __init__(self, seed: int = 0, scale: float = 1.0) -> None:
        super().__init__()
        self.seed_value = int(seed)
        self.scale = float(scale)

    def config(self) -> dict[str, Any]:
        return {"seed": self.seed_value, "scale": self.scale}

    def init_state(self, net: Any) -> dict[str, Tensor]:
        return feedback_weights(net, self.seed_value, self.scale)

    def coefficients(self, ctx: LayerContext) -> Tensor:
        return ctx.rule_state[f"B{ctx.layer.index}"].to(ctx.weight.dtype)

    def __repr__(self) -> str:
        return f"FeedbackAlignment(seed={self.seed_value}, scale={self.scale})"
