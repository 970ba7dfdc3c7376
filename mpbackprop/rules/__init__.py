"""Backward rules (exact, feedback alignment, learned) and update rules (SGD, Adam, learned)."""

from __future__ import annotations

from .base import BackwardRule, LayerContext, NodeContext, UpdateContext, UpdateRule
from .exact import Exact
from .fa import FeedbackAlignment, feedback_weights
from .optim import SGD, Adam

__all__ = [
    "BackwardRule", "UpdateRule", "LayerContext", "NodeContext", "UpdateContext",
    "Exact", "FeedbackAlignment", "feedback_weights", "SGD", "Adam",
]
