"""Saving and loading rules: one ``.pt`` file, loaded with ``torch.load(weights_only=True)``.

Loading a rule file never executes code: the file holds only plain containers, strings,
numbers and tensors. Nor can it exhaust memory: every size in a rule's configuration is checked
against its limit (:data:`~mpbackprop.limits.SIZE_LIMITS`: width <= 1024, <= 8 state
channels, <= 16 hidden layers; seeds 0 <= seed < 2**63; numbers finite) before anything is built,
and the saved tensors must have exactly the shapes the configuration implies. A missing,
corrupt, foreign or out-of-bounds file raises :class:`GraphFileError` with one line naming the
file and what is wrong. The configuration and provenance strings are strict JSON
(:mod:`mpbackprop._json`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_torch_save
from .._json import dumps
from ..errors import GraphFileError
from ..limits import MAX_SEED, SIZE_LIMITS
from .base import BackwardRule, UpdateRule
from .exact import Exact
from .fa import FeedbackAlignment
from .learned import LearnedBackward, LearnedUpdate
from .optim import SGD, Adam
from .scheduled import ScheduledUpdate

__all__ = ["save_rule", "load_rule", "rule_path", "DEFAULT_RULE", "BACKWARD_RULES", "UPDATE_RULES", "make_backward", "make_update",
           "load_matching_state"]

_FORMAT = "mpbackprop-rule"

#: What learned rules whose files predate the ``layers``/``features`` options were, per (part, name).
_LEGACY = {("backward", "learned"): {"features": "full"}, ("update", "learned"): {"layers": 2, "features": "full"}}

#: Inclusive bounds of the integers a rule configuration may hold (checked on load).
_INT_LIMITS: dict[str, tuple[int, int]] = {**SIZE_LIMITS, "seed": (0, MAX_SEED)}

#: The rule shipped with the package (made by ``mpbackprop meta-train``; provenance beside it).
DEFAULT_RULE = Path(__file__).resolve().parents[1] / "data" / "default_rule.pt"

BACKWARD_RULES: dict[str, type[BackwardRule]] = {
    "exact": Exact, "fa": FeedbackAlignment, "learned": LearnedBackward,
}
UPDATE_RULES: dict[str, type[UpdateRule]] = {"sgd": SGD, "adam": Adam, "learned": LearnedUpdate,
                                             "scheduled": ScheduledUpdate}


def make_backward(name: str, **kwargs: Any) -> BackwardRule:
    """A backward rule by name (``exact``, ``fa``, ``learned``)."""
    try:
        return BACKWARD_RULES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown backward rule {name!r}; known: {', '.join(BACKWARD_RULES)}") from None


def make_update(name: str, **kwargs: Any) -> UpdateRule:
    """An update rule by name (``sgd``, ``adam``, ``learned``, ``scheduled``)."""
    try:
        return UPDATE_RULES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown update rule {name!r}; known: {', '.join(UPDATE_RULES)}") from None


def save_rule(path: str | os.PathLike, backward: BackwardRule, update: UpdateRule,
              meta: dict[str, Any] | None = None) -> Path:
    """Write a (backward, update) pair with its configuration and provenance, atomically."""
    path = Path(path)
    blob = {
        "format": _FORMAT,
        "version": 1,
        "backward": {"name": backward.name, "config": dumps(backward.config())},
        "update": {"name": update.name, "config": dumps(update.config())},
        "backward_state": {k: v.detach().clone() for k, v in backward.state_dict().items()},
        "update_state": {k: v.detach().clone() for k, v in update.state_dict().items()},
        "meta": dumps(meta or {}),
    }
    return atomic_torch_save(blob, path)


def load_rule(path: str | os.PathLike) -> tuple[BackwardRule, UpdateRule, dict[str, Any]]:
    """Load ``(backward, update, meta)`` saved by :func:`save_rule`."""
    path = Path(path)
    if not path.is_file():
        raise GraphFileError(f"{path}: no such rule file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - corrupt/foreign files raise many kinds
        raise GraphFileError(f"{path}: not a rule file written by mpbackprop ({type(exc).__name__})") from exc
    if not isinstance(blob, dict) or blob.get("format") != _FORMAT:
        raise GraphFileError(f"{path}: a torch file, but not an mpbackprop rule")
    parts = {part: _part(path, blob, part, known) for part, known in (("backward", BACKWARD_RULES),
                                                                      ("update", UPDATE_RULES))}
    backward, update = (_build(path, blob, part, *parts[part]) for part in ("backward", "update"))
    try:
        meta = json.loads(blob.get("meta", "{}"))
    except (TypeError, ValueError) as exc:
        raise GraphFileError(f"{path}: rule file is damaged (its provenance is not JSON: {exc})") from exc
    if not isinstance(meta, dict):
        raise GraphFileError(f"{path}: rule file is damaged (its provenance is not a JSON object)")
    return backward, update, meta


def _part(path: Path, blob: dict[str, Any], part: str, known: dict[str, type[Any]]) -> tuple[type[Any], dict[str, Any]]:
    """The class and the checked constructor arguments of one part of a rule file (nothing built yet)."""
    entry = blob.get(part)
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("config"), str):
        raise GraphFileError(f"{path}: rule file is damaged (no {part} rule name and config)")
    name = entry["name"]
    if name not in known:
        raise GraphFileError(f"{path}: unknown {part} rule {name!r}; known: {', '.join(known)}")
    return known[name], _config(path, part, name, entry["config"])


def _build(path: Path, blob: dict[str, Any], part: str, cls: type[Any], kwargs: dict[str, Any]) -> Any:
    """One part of a rule file, built from checked arguments, with its state checked and loaded."""
    try:
        rule = cls(**kwargs)
    except (TypeError, ValueError) as exc:  # unknown keys, bad choices
        raise GraphFileError(f"{path}: rule file is damaged ({part} config: {exc})") from exc
    _load_state(path, part, rule, blob.get(f"{part}_state"))
    return rule


def _config(path: Path, part: str, name: str, text: str) -> dict[str, Any]:
    """Constructor arguments of one part of a rule file, within bounds; options the file predates
    get their old values."""
    try:
        cfg = json.loads(text)
    except ValueError as exc:
        raise GraphFileError(f"{path}: rule file is damaged (its {part} config is not JSON: {exc})") from exc
    if not isinstance(cfg, dict):
        raise GraphFileError(f"{path}: rule file is damaged (its {part} config is not a JSON object)")
    for key, value in cfg.items():
        _check_value(path, part, key, value)
    if isinstance(cfg.get("betas"), list):
        cfg["betas"] = tuple(cfg["betas"])
    return {**_LEGACY.get((part, name), {}), **cfg}


def _check_value(path: Path, part: str, key: str, value: Any) -> None:
    """Refuse an out-of-bounds integer (:data:`_INT_LIMITS`) or a number that is not finite."""
    where = f"{path}: the {part} rule's {key} is {value!r}"
    if key in _INT_LIMITS:
        lo, hi = _INT_LIMITS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise GraphFileError(f"{where}; allowed: an integer in {lo}..{hi} (the file is damaged or not "
                                 "made by mpbackprop)")
    numbers = value if isinstance(value, list) else [value]
    if any(isinstance(v, float) and not math.isfinite(v) for v in numbers):
        raise GraphFileError(f"{where}; allowed: finite numbers (the file is damaged or not made by mpbackprop)")


def _load_state(path: Path, part: str, rule: Any, state: Any) -> None:
    """Load ``state`` into ``rule`` if it has exactly the keys and shapes of the rule's own state."""
    if not isinstance(state, dict):
        raise GraphFileError(f"{path}: rule file is damaged (no {part} state)")
    try:
        load_matching_state(rule, state)
    except ValueError as exc:
        raise GraphFileError(f"{path}: the {part} state does not match the {part} rule's config ({exc})") from None


def load_matching_state(module: torch.nn.Module, state: Any) -> None:
    """Load ``state`` into ``module`` if it has exactly the keys, shapes and finite values of the
    module's own state; else raise ``ValueError`` with one line naming what differs (``w has shape
    [3, 3], the config needs [4, 5]; missing b``), where ``load_state_dict`` would say only its first
    line, or load what it should refuse. Shared by rule files and meta-training checkpoints."""
    if not isinstance(state, dict):
        raise ValueError(f"no state dict (a {type(state).__name__})")
    expected = module.state_dict()
    problems = []
    for key, want in expected.items():
        if key not in state:
            continue
        have = state[key]
        if not isinstance(have, torch.Tensor):
            problems.append(f"{key} is not a tensor")
        elif have.shape != want.shape:
            problems.append(f"{key} has shape {list(have.shape)}, the config needs {list(want.shape)}")
        elif have.is_floating_point() and not bool(torch.isfinite(have).all()):
            problems.append(f"{key} holds values that are not finite")
    missing = [key for key in expected if key not in state]
    unexpected = [str(key) for key in state if key not in expected]
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if problems:
        raise ValueError(_some(problems, sep="; "))
    module.load_state_dict(state)


def _some(items: list[str], shown: int = 4, sep: str = ", ") -> str:
    """The first ``shown`` items joined by ``sep``, then how many more there are."""
    text = sep.join(str(i) for i in items[:shown])
    return text + (f"{sep}and {len(items) - shown} more" if len(items) > shown else "")


def rule_path(name: str | os.PathLike) -> Path:
    """Resolve ``default`` (the packaged rule), a meta-training directory (its ``best.pt``, else
    ``rule.pt``) or a rule file to a path; a missing one raises :class:`GraphFileError`."""
    if str(name) == "default":
        if not DEFAULT_RULE.is_file():
            raise GraphFileError("the packaged default rule is missing from this installation")
        return DEFAULT_RULE
    path = Path(name)
    if path.is_dir():
        path = path / "best.pt" if (path / "best.pt").is_file() else path / "rule.pt"
    if not path.is_file():
        raise GraphFileError(f"{name}: no such rule (give a meta-training directory, a .pt file or 'default')")
    return path
