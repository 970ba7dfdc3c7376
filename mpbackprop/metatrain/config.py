"""Meta-training configuration: one dataclass, written as ``config.json`` next to every checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

__all__ = ["MetaConfig"]


@dataclass
class MetaConfig:
    """Everything that defines a meta-training run (same config + seed → same run).

    Attributes
    ----------
    family : str
        Task family (``mpbackprop.tasks.FAMILIES``).
    estimator : str
        ``tbptt`` (truncated backprop through the unroll), ``es`` (antithetic evolution
        strategies) or ``pes`` (persistent ES).
    outer_steps : int
        Outer (meta-parameter) updates.
    unroll : tuple of int
        Range ``(lo, hi)`` of inner horizons ``T``, sampled log-uniformly per task.
    truncation : int
        Inner steps per truncation ``K``; the inner state carries across truncations.
    tasks_per_step : int
        Tasks averaged per outer step.
    objective : str
        ``mean`` (mean log validation loss over the unroll), ``final`` (at ``T`` only), or
        ``mixed`` (``final_weight`` on the end, the rest spread over the unroll).
    state_dim, hidden : int
        Channels of the backward state and width of the backward rule's MLPs.
    update_hidden, update_layers : int
        Width and depth of the learned update's per-parameter MLP.
    features : str
        ``compact`` or ``full`` inputs of both learned rules (see :mod:`mpbackprop.rules.learned`).
    weight_input : bool
        Whether the compact update's MLP sees the (per-tensor normalised) weight.
    backward_init, update_init : str
        ``backprop``/``feedback`` and ``adam``/``scratch`` (see :mod:`mpbackprop.rules.learned`).
    update_rule : str
        ``scheduled`` (:class:`~mpbackprop.rules.ScheduledUpdate`: Adam's direction, a bounded learned
        correction, a step size scheduled over the run's stated length) or ``learned``
        (:class:`~mpbackprop.rules.LearnedUpdate`, the design of rules before it; ``update_init``,
        ``update_layers``, ``features`` and ``weight_input`` apply to it).
    correction, weight_decay : float, bool
        Bound of the ``scheduled`` update's learned correction; whether it learns a decoupled weight decay.
    start_offsets : bool
        Start each task slot's first inner run at a random step of its horizon (run there with the
        initial rule, without gradients), so the slots are out of phase from the first outer step.
    eval_multiples : tuple of int
        Meta-validation trains each validation task for ``k·eval_horizon`` steps for each ``k`` here
        (the rule told that length) and scores the mean log validation loss at the end, averaged over
        the ``k``; ``best.pt`` is the checkpoint with the lowest score.
    """

    family: str = "augmented"
    estimator: str = "pes"
    outer_steps: int = 400
    unroll: tuple[int, int] = (100, 2500)
    truncation: int = 20
    tasks_per_step: int = 4
    objective: str = "mixed"
    final_weight: float = 0.5
    meta_lr: float = 3e-3
    clip_norm: float = 1.0
    state_dim: int = 1
    hidden: int = 4
    update_hidden: int = 4
    update_layers: int = 1
    features: str = "compact"
    weight_input: bool = False
    backward_init: str = "backprop"
    update_init: str = "adam"
    update_rule: str = "scheduled"
    correction: float = 0.5
    weight_decay: bool = False
    start_offsets: bool = True
    eval_multiples: tuple[int, ...] = (1, 10, 25)
    update_lr: float = 1e-2
    es_sigma: float = 0.01
    es_pairs: int = 4
    val_examples: int = 256
    eval_every: int = 100
    eval_tasks: int = 4
    eval_horizon: int = 100
    checkpoint_every: int = 20
    diverge_factor: float = 5.0
    seed: int = 0

    def __post_init__(self) -> None:
        self.unroll = (int(self.unroll[0]), int(self.unroll[1]))
        self.eval_multiples = tuple(int(k) for k in self.eval_multiples)
        problems = []
        if self.update_rule not in ("scheduled", "learned"):
            problems.append(f"update_rule must be scheduled or learned (got {self.update_rule!r})")
        if not self.eval_multiples or min(self.eval_multiples) < 1:
            problems.append(f"eval_multiples must be a non-empty list of integers >= 1 (got {list(self.eval_multiples)})")
        if self.estimator not in ("tbptt", "es", "pes"):
            problems.append(f"estimator must be tbptt, es or pes (got {self.estimator!r})")
        if self.objective not in ("mean", "final", "mixed"):
            problems.append(f"objective must be mean, final or mixed (got {self.objective!r})")
        if not 1 <= self.unroll[0] <= self.unroll[1]:
            problems.append(f"unroll range must satisfy 1 <= lo <= hi (got {self.unroll})")
        if self.truncation < 1 or self.tasks_per_step < 1 or self.outer_steps < 0:
            problems.append("truncation and tasks_per_step must be >= 1, outer_steps >= 0")
        if self.backward_init not in ("backprop", "feedback"):
            problems.append(f"backward_init must be backprop or feedback (got {self.backward_init!r})")
        if self.features not in ("compact", "full"):
            problems.append(f"features must be compact or full (got {self.features!r})")
        if self.update_layers < 1 or self.update_hidden < 1 or self.hidden < 1:
            problems.append("hidden, update_hidden and update_layers must be >= 1")
        if self.update_init not in ("adam", "scratch"):
            problems.append(f"update_init must be adam or scratch (got {self.update_init!r})")
        if problems:
            raise ValueError("; ".join(problems))

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["unroll"] = list(self.unroll)
        d["eval_multiples"] = list(self.eval_multiples)
        return d

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "MetaConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def load(cls, path: str | Path) -> "MetaConfig":
        return cls.from_json(json.loads(Path(path).read_text()))

    @classmethod
    def load_run(cls, path: str | Path) -> "MetaConfig":
        """A run's own ``config.json``; runs from before the ``features`` option had ``full`` rules
        with two update layers as wide as ``hidden``; runs from before ``update_rule`` had the
        ``learned`` update, validation at T and 2T and no start offsets (family and unroll were always
        written)."""
        data = json.loads(Path(path).read_text())
        if "features" not in data:
            data = {"features": "full", "update_hidden": data.get("hidden", 16), "update_layers": 2, **data}
        if "update_rule" not in data:
            data = {"update_rule": "learned", "eval_multiples": [1, 2], "start_offsets": False, **data}
        return cls.from_json(data)

    def replace(self, **changes: Any) -> "MetaConfig":
        return MetaConfig.from_json({**self.to_json(), **{k: v for k, v in changes.items() if v is not None}})
