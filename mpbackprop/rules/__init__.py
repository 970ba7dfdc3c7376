"""Backward rules (exact, feedback alignment, learned) and update rules (SGD, Adam, learned, scheduled)."""

from __future__ import annotations

from .base import BackwardRule, LayerContext, NodeContext, UpdateContext, UpdateHistory, UpdateRule
from .exact import Exact
from .fa import FeedbackAlignment, feedback_weights
from .io import BACKWARD_RULES, DEFAULT_RULE, UPDATE_RULES, load_rule, make_backward, make_update, rule_path, save_rule
from .learned import LearnedBackward, LearnedUpdate
from .optim import SGD, Adam
from .scheduled import ScheduledUpdate

__all__ = [
    "BackwardRule", "UpdateRule", "LayerContext", "NodeContext", "UpdateContext", "UpdateHistory",
    "Exact", "FeedbackAlignment", "feedback_weights", "SGD", "Adam", "LearnedBackward", "LearnedUpdate", "ScheduledUpdate",
    "save_rule", "load_rule", "rule_path", "DEFAULT_RULE", "make_backward", "make_update", "BACKWARD_RULES", "UPDATE_RULES",
]
