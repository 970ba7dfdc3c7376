"""Meta-training configuration: one dataclass, written as ``config.json`` next to every checkpoint."""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from .._json import dumps
from ..errors import first_line
from ..limits import MAX_META_SEED, SIZE_LIMITS

__all__ = ["MetaConfig", "CHOICES", "asked_settings", "default_run_dir"]

#: The values of the fields that take one of a few names (the command line's choices come from here).
CHOICES: dict[str, tuple[str, ...]] = {
    "estimator": ("tbptt", "es", "pes"),
    "objective": ("mean", "final", "mixed"),
    "features": ("compact", "full"),
    "backward_init": ("backprop", "feedback"),
    "update_init": ("adam", "scratch"),
    "update_rule": ("scheduled", "learned"),
}


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
    correction, weight_decay, weight_decay_init, horizon_exponent, horizon_init : float, bool, float, bool, float
        Bound of the ``scheduled`` update's learned correction; whether it learns a decoupled weight decay,
        and where its ``λ`` starts (on, from 0.1, in the recipe since v7: the shipped v4 rule reached a lower
        validation loss than tuned Adam early on small datasets, then overfit; runs' configs written before
        the option read as 1e-4, the start it had);
        whether it learns the exponent ``b`` of its peak step size in the stated horizon
        (``update_lr·(T/100)^{-b}``), and where ``b`` starts.
    width_init, width_wide_only : float, bool
        Where the ``scheduled`` update's width exponent ``p`` starts (weights' steps scale as
        ``(fan_in/64)^{-p}``), and whether that factor applies only to fan-ins above 64; runs' configs
        written before the options read as 0 and False, what they had.
    learn_backward : bool
        Meta-train the learned backward pass (:class:`~mpbackprop.rules.LearnedBackward`) with the update; if
        False the rule's backward is exact backprop (``exact`` in the rule file). Off in the long-horizon
        recipe: its learned backward stayed near backprop in every analysis, and small learned deviations
        hurt most at 10T and 25T.
    scalar_lr_mult : float
        The meta-learning rate of the rule's scalar meta-parameters (the scheduled update's ``a``, ``b``,
        ``f``, ``p`` and weight decay: the 0-dimensional ones) is ``meta_lr`` times this; 1 keeps one
        optimizer group for all (as runs before this option).
    start_offsets : bool
        Start each task slot's first inner run at a random step of its horizon (run there with the
        initial rule, without gradients), so the slots are out of phase from the first outer step.
    task_file, task_sha256 : str, optional
        A task file (:mod:`mpbackprop.tasks.taskfile`) whose family is the run's (``family`` is then its name),
        stored as an absolute path, and the fingerprint of the file and its data; a run refuses to
        continue, or be evaluated, with a file that has moved or changed.
    eval_multiples : tuple of int
        Meta-validation trains each validation task for ``k·eval_horizon`` steps for each ``k`` here
        (the rule told that length) and scores the mean log validation loss at the end, averaged over
        the ``k``; ``best.pt`` is the checkpoint with the lowest score.
    device : str
        Where the run computes (:data:`mpbackprop.device.DEVICES`); configs written before the option
        read as ``cpu``. Meta-training itself runs on the CPU only so far: another device is refused
        when the run starts (the name is checked here, so a config from a GPU machine still loads).
    """

    family: str = "augmented"
    estimator: str = "pes"
    outer_steps: int = 300
    unroll: tuple[int, int] = (100, 2500)
    truncation: int = 20
    tasks_per_step: int = 4
    objective: str = "mixed"
    final_weight: float = 0.8
    meta_lr: float = 1e-3
    scalar_lr_mult: float = 1.0
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
    weight_decay: bool = True
    weight_decay_init: float = 0.1
    horizon_exponent: bool = True
    learn_backward: bool = False
    horizon_init: float = 0.6
    width_init: float = 0.0
    width_wide_only: bool = False
    start_offsets: bool = True
    eval_multiples: tuple[int, ...] = (1, 10, 25)
    update_lr: float = 4e-2
    es_sigma: float = 0.01
    es_pairs: int = 4
    val_examples: int = 256
    eval_every: int = 100
    eval_tasks: int = 4
    eval_horizon: int = 100
    checkpoint_every: int = 20
    diverge_factor: float = 5.0
    seed: int = 0
    device: str = "cpu"
    task_file: str | None = None
    task_sha256: str | None = None

    def __post_init__(self) -> None:
        if self.task_file is not None:  # register the file's family first: it is the run's family
            self._load_task_file()
        problems = [p for name in _RULES if (p := _check(self, name))]
        if not problems and self.truncation > self.unroll[1]:
            problems.append(f"truncation must not exceed the longest unroll (got {self.truncation} > "
                            f"{self.unroll[1]}; an inner run never has more steps than its horizon, so use "
                            f"truncation <= {self.unroll[1]})")
        if problems:
            raise ValueError("; ".join(problems))

    def _load_task_file(self) -> None:
        """Run the task file (``ValueError`` when it is missing, broken, or differs from ``task_sha256``);
        record its absolute path and fingerprint, and take its family."""
        from ..errors import TaskFileError
        from ..tasks.taskfile import load_task_file

        if not isinstance(self.task_file, str) or not self.task_file:
            raise ValueError(f"task_file must be the path of a task file (got {_show(self.task_file)})")
        if self.task_sha256 is not None and not (isinstance(self.task_sha256, str)
                                                 and re.fullmatch(r"[0-9a-f]{64}", self.task_sha256)):
            raise ValueError(f"task_sha256 must be 64 hex digits (got {_show(self.task_sha256)})")
        try:
            loaded = load_task_file(self.task_file, self.task_sha256)
        except TaskFileError as exc:
            raise ValueError(str(exc)) from None
        self.task_file, self.task_sha256, self.family = str(loaded.path), loaded.sha256, loaded.family.name

    def to_json(self) -> dict[str, Any]:
        """Plain fields; ``task_file`` and ``task_sha256`` only for a task-file run (so configs of the
        built-in families read as they did before task files existed)."""
        d = asdict(self)
        d["unroll"] = list(self.unroll)
        d["eval_multiples"] = list(self.eval_multiples)
        for key in ("task_file", "task_sha256"):
            if d[key] is None:
                del d[key]
        return d

    def dumps(self) -> str:
        """``config.json``'s text (strict JSON)."""
        return dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def fields_of(cls, data: Any) -> dict[str, Any]:
        """``data`` if it is a JSON object whose keys are all config fields (its values are checked
        when a config is made of them), else ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"a config is a JSON object of MetaConfig fields (got a {type(data).__name__})")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys: {', '.join(unknown)}")
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "MetaConfig":
        return cls(**cls.fields_of(data))

    @classmethod
    def load_run(cls, path: str | Path) -> "MetaConfig":
        """A run's own ``config.json``; runs from before the ``features`` option had ``full`` rules
        with two update layers as wide as ``hidden``; runs from before ``update_rule`` had the
        ``learned`` update, validation at T and 2T and no start offsets; runs from before
        ``weight_decay_init`` started their decay (when on) at 1e-4, and from before ``width_init`` their
        width exponent at 0 (family, unroll, ``weight_decay`` and
        ``update_lr`` were always written)."""
        data = json.loads(Path(path).read_text())
        if "features" not in data:
            data = {"features": "full", "update_hidden": data.get("hidden", 16), "update_layers": 2, **data}
        if "update_rule" not in data:
            data = {"update_rule": "learned", "eval_multiples": [1, 2], "start_offsets": False,
                    "learn_backward": True, **data}
        if "weight_decay_init" not in data:  # before the option: the decay (if on) started at 1e-4
            data = {"weight_decay": False, "weight_decay_init": 1e-4, **data}
        if "width_init" not in data:  # before the option: p started at 0
            data = {"width_init": 0.0, **data}
        if "width_wide_only" not in data:  # before the option: the factor applied to every fan-in
            data = {"width_wide_only": False, **data}
        return cls.from_json(data)

    def replace(self, **changes: Any) -> "MetaConfig":
        changes = {k: v for k, v in changes.items() if v is not None}
        base = self.to_json()
        if "task_file" in changes and "task_sha256" not in changes and not _same_file(changes["task_file"],
                                                                                     self.task_file):
            base.pop("task_sha256", None)  # another file: its own fingerprint
        return MetaConfig.from_json({**base, **changes})


def _same_file(a: Any, b: str | None) -> bool:
    try:
        return b is not None and Path(a).expanduser().resolve() == Path(b).resolve()
    except (TypeError, OSError):
        return False


# ----------------------------------------------------------------------------- validation
# One rule per field: (check, what is allowed). A check returns the value in its canonical type
# (int, float, tuple) or raises ValueError; the refusal then says what is allowed.
Check = Callable[[Any], Any]


def _integer(lo: int, hi: int | None = None) -> tuple[Check, str]:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
            raise ValueError
        return int(v)

    return check, f"an integer >= {lo}" if hi is None else f"an integer in {lo}..{hi}"


def _number(ok: Callable[[float], bool], allowed: str) -> tuple[Check, str]:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not ok(float(v)):
            raise ValueError
        return float(v)

    return check, allowed


def _choice(*options: str) -> tuple[Check, str]:
    def check(v: Any) -> str:
        if v not in options:
            raise ValueError
        return str(v)

    return check, "one of " + ", ".join(options)


def _family(v: Any) -> str:
    return _choice(*_families())[0](v)


def _families() -> list[str]:
    from ..tasks.registry import FAMILIES  # tasks pulls in the engine: imported only when a config is checked

    return list(FAMILIES)


def _devices() -> tuple[str, ...]:
    from ..device import DEVICES

    return DEVICES


def _device(v: Any) -> str:
    """A device name (its availability is checked when a run starts: :func:`mpbackprop.device.resolve`)."""
    if not isinstance(v, str) or not re.fullmatch(r"(cpu|cuda(:\d+)?)", v):
        raise ValueError(v)
    return v


def _flag(v: Any) -> bool:
    if not isinstance(v, bool):
        raise ValueError
    return v


def _range(v: Any) -> tuple[int, int]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError
    lo, hi = (_integer(1)[0](x) for x in v)
    if lo > hi:
        raise ValueError
    return lo, hi


def _multiples(v: Any) -> tuple[int, ...]:
    if not isinstance(v, (list, tuple)) or not 1 <= len(v) <= 8:
        raise ValueError
    return tuple(_integer(1, 1000)[0](x) for x in v)


def _size(kind: str) -> tuple[Check, str]:
    """The bounds of the learned rules' sizes of this kind (:data:`mpbackprop.limits.SIZE_LIMITS`)."""
    return _integer(*SIZE_LIMITS[kind])


_AT_LEAST_1 = _integer(1)
_POSITIVE = _number(lambda v: v > 0, "a finite number > 0")
_RULES: dict[str, tuple[Check, str | Callable[[], str]]] = {
    "family": (_family, lambda: "one of " + ", ".join(_families())),
    "estimator": _choice(*CHOICES["estimator"]),
    "outer_steps": _integer(0),
    "unroll": (_range, "a pair [lo, hi] of integers with 1 <= lo <= hi"),
    "truncation": _AT_LEAST_1,
    "tasks_per_step": _AT_LEAST_1,
    "objective": _choice(*CHOICES["objective"]),
    "final_weight": _number(lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "meta_lr": _POSITIVE,
    "scalar_lr_mult": _number(lambda v: 0 < v <= 100, "a number in (0, 100]"),
    "clip_norm": _POSITIVE,
    "state_dim": _size("state_dim"),
    "hidden": _size("hidden"),
    "update_hidden": _size("hidden"),
    "update_layers": _size("layers"),
    "features": _choice(*CHOICES["features"]),
    "weight_input": (_flag, "true or false"),
    "backward_init": _choice(*CHOICES["backward_init"]),
    "update_init": _choice(*CHOICES["update_init"]),
    "update_rule": _choice(*CHOICES["update_rule"]),
    "correction": _number(lambda v: 0 <= v <= 10, "a number in [0, 10]"),
    "weight_decay": (_flag, "true or false"),
    "weight_decay_init": _POSITIVE,
    "horizon_exponent": (_flag, "true or false"),
    "learn_backward": (_flag, "true or false"),
    "horizon_init": _number(lambda v: -1 < v < 1, "a number in (-1, 1)"),
    "width_init": _number(lambda v: -1 < v < 1, "a number in (-1, 1)"),
    "width_wide_only": (_flag, "true or false"),
    "start_offsets": (_flag, "true or false"),
    "eval_multiples": (_multiples, "a list of 1 to 8 integers in 1..1000 (multiples of eval_horizon)"),
    "update_lr": _POSITIVE,
    "es_sigma": _POSITIVE,
    "es_pairs": _AT_LEAST_1,
    "val_examples": _AT_LEAST_1,
    "eval_every": _AT_LEAST_1,
    "eval_tasks": _AT_LEAST_1,
    "eval_horizon": _AT_LEAST_1,
    "checkpoint_every": _AT_LEAST_1,
    "diverge_factor": _number(lambda v: v > 1, "a finite number > 1, a multiple of the initial loss"),
    "seed": _integer(0, MAX_META_SEED),
    "device": (lambda v: _device(v), lambda: "one of " + ", ".join(_devices()) + " (or cuda:N)"),
    "task_file": (lambda v: v, "a path"),  # checked (and loaded) first, in __post_init__
    "task_sha256": (lambda v: v, "64 hex digits"),
}
assert set(_RULES) == {f.name for f in fields(MetaConfig)}, "every config field needs a rule"


def _check(cfg: MetaConfig, name: str) -> str | None:
    """Put ``cfg.<name>`` in its canonical type; the problem (one phrase) if its value is not allowed."""
    check, allowed = _RULES[name]
    value = getattr(cfg, name)
    try:
        setattr(cfg, name, check(value))
    except (ValueError, TypeError):
        return f"{name} must be {allowed() if callable(allowed) else allowed} (got {_show(value)})"
    return None


def _show(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def asked_settings(config_path: Path | None, flags: dict[str, Any],
                   resume: bool) -> tuple[dict[str, Any], MetaConfig | None]:
    """What a command line asks for: the ``config_path`` file's fields, then ``flags`` (given values only).

    Returns ``(asked, cfg)``: ``asked`` the file's fields; ``cfg`` the checked configuration they and the
    flags make, or ``None`` with ``resume`` (a resumed run checks what is asked against its own
    ``config.json``: :class:`~mpbackprop.metatrain.MetaTrainer`). Raises ``ValueError`` with a one-line
    message for a file that is not a valid config or a value that is refused.
    """
    try:
        asked: dict[str, Any] = MetaConfig.fields_of(json.loads(Path(config_path).read_text())) if config_path else {}
        base = None if resume else MetaConfig.from_json(asked)
    except (ValueError, TypeError) as exc:  # JSON syntax, unknown keys, bad values
        raise ValueError(f"{config_path}: not a valid meta-training config ({first_line(exc)})") from None
    return asked, None if base is None else base.replace(**flags)


def default_run_dir(cfg: MetaConfig | None, asked: dict[str, Any], flags: dict[str, Any]) -> Path:
    """``runs/<family>-<estimator>-s<seed>`` of ``cfg``, else of the default recipe updated by what is asked."""
    named = cfg.to_json() if cfg is not None else {**MetaConfig().to_json(), **asked, **flags}
    return Path("runs") / f"{named['family']}-{named['estimator']}-s{named['seed']}"
