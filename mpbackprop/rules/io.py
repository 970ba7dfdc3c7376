"""Saving and loading rules: one ``.pt`` file, loaded with ``torch.load(weights_only=True)``.

Loading a rule file never executes code: the file holds only plain containers, strings,
numbers and tensors. A missing, corrupt or foreign file raises :class:`GraphFileError`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_torch_save
from ..errors import GraphFileError
from .base import BackwardRule, UpdateRule
from .exact import Exact
from .fa import FeedbackAlignment
from .learned import LearnedBackward, LearnedUpdate
from .optim import SGD, Adam

__all__ = ["save_rule", "load_rule", "rule_path", "DEFAULT_RULE", "BACKWARD_RULES", "UPDATE_RULES", "make_backward", "make_update"]

_FORMAT = "mpbackprop-rule"

#: What learned rules whose files predate the ``layers``/``features`` options were, per (part, name).
_LEGACY = {("backward", "learned"): {"features": "full"}, ("update", "learned"): {"layers": 2, "features": "full"}}

#: The rule shipped with the package (made by ``mpbackprop meta-train``; provenance beside it).
DEFAULT_RULE = Path(__file__).resolve().parents[1] / "data" / "default_rule.pt"

BACKWARD_RULES: dict[str, type[BackwardRule]] = {
    "exact": Exact, "fa": FeedbackAlignment, "learned": LearnedBackward,
}
UPDATE_RULES: dict[str, type[UpdateRule]] = {"sgd": SGD, "adam": Adam, "learned": LearnedUpdate}


def make_backward(name: str, **kwargs: Any) -> BackwardRule:
    """A backward rule by name (``exact``, ``fa``, ``learned``)."""
    try:
        return BACKWARD_RULES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown backward rule {name!r}; known: {', '.join(BACKWARD_RULES)}") from None


def make_update(name: str, **kwargs: Any) -> UpdateRule:
    """An update rule by name (``sgd``, ``adam``, ``learned``)."""
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
        "backward": {"name": backward.name, "config": json.dumps(backward.config())},
        "update": {"name": update.name, "config": json.dumps(update.config())},
        "backward_state": {k: v.detach().clone() for k, v in backward.state_dict().items()},
        "update_state": {k: v.detach().clone() for k, v in update.state_dict().items()},
        "meta": json.dumps(meta or {}),
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
    try:
        backward = make_backward(blob["backward"]["name"], **_config(blob, "backward"))
        update = make_update(blob["update"]["name"], **_config(blob, "update"))
        backward.load_state_dict(blob["backward_state"])
        update.load_state_dict(blob["update_state"])
        meta = json.loads(blob.get("meta", "{}"))
    except Exception as exc:  # noqa: BLE001
        raise GraphFileError(f"{path}: rule file is damaged ({exc})") from exc
    return backward, update, meta


def _config(blob: dict[str, Any], part: str) -> dict[str, Any]:
    """Constructor arguments of one part of a rule file; options the file predates get their old values."""
    legacy = _LEGACY.get((part, blob[part]["name"]), {})
    return {**legacy, **_kwargs(json.loads(blob[part]["config"]))}


def _kwargs(cfg: dict[str, Any]) -> dict[str, Any]:
    if "betas" in cfg:
        cfg["betas"] = tuple(cfg["betas"])
    return cfg


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
