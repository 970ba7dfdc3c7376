"""Loss functions by name. A loss maps ``(output (B, ...), target)`` to the batch-mean loss."""

from __future__ import annotations

from typing import Callable

import torch.nn.functional as F
from torch import Tensor

__all__ = ["LossFn", "LOSSES", "resolve_loss"]

LossFn = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    """Softmax cross-entropy on logits ``(B, C)`` with integer class targets ``(B,)``."""
    return F.cross_entropy(output.reshape(output.shape[0], -1), target)


def mse(output: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over all elements."""
    return F.mse_loss(output.reshape(target.shape), target)


LOSSES: dict[str, LossFn] = {"cross_entropy": cross_entropy, "mse": mse}


def resolve_loss(loss: str | LossFn) -> LossFn:
    """A loss callable from a name in :data:`LOSSES` or a callable."""
    if callable(loss):
        return loss
    try:
        return LOSSES[loss]
    except KeyError:
        raise ValueError(f"unknown loss {loss!r}; known: {', '.join(LOSSES)}") from None
