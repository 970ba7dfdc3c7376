"""Meta-training (method.md §4): fit a learned rule so target networks train fast and well."""

from __future__ import annotations

from .config import MetaConfig
from .estimators import AntitheticES, Estimate, Estimator, PersistentES, TruncatedBackprop, make_estimator
from .loop import MetaTrainer, RunSummary, build_rules, meta_validate

__all__ = ["MetaConfig", "MetaTrainer", "RunSummary", "build_rules", "meta_validate", "Estimate", "Estimator",
           "TruncatedBackprop", "AntitheticES", "PersistentES", "make_estimator"]
