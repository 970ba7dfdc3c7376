"""Strict JSON: every document mpbackprop writes parses with jq, JavaScript and strict libraries.

Python's ``json`` writes ``NaN`` / ``Infinity`` for non-finite floats by default; those are not
JSON. Here a non-finite float becomes ``null``, and writers that need to tell *why* a value is
missing add a flag of their own (``"diverged": true``). Use :func:`dumps` / :func:`dump_line`
for every JSON or JSON Lines output, never ``json.dumps`` directly.
"""

from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["finite_or_none", "sanitize", "dumps", "dump_line", "loads_strict"]


def finite_or_none(x: Any) -> float | None:
    """``float(x)`` if ``x`` is a finite number, else ``None`` (also for ``None``, a bool, a string or
    anything else that is not a number, as a hand-edited file may hold)."""
    if x is None or isinstance(x, (bool, str, bytes)):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def sanitize(obj: Any) -> Any:
    """A copy of ``obj`` with every non-finite float replaced by ``None`` (dicts, lists, tuples,
    numpy and torch scalars handled; tuples become lists, as JSON has no tuple)."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (str, int)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, str) else k: sanitize(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [sanitize(v) for v in obj]
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item) and getattr(obj, "ndim", 0) == 0:
        return sanitize(item())
    tolist = getattr(obj, "tolist", None)  # numpy arrays / torch tensors
    if callable(tolist):
        return sanitize(tolist())
    return obj


def dumps(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`sanitize` (obj) with ``allow_nan=False``: strict JSON or an error."""
    return json.dumps(sanitize(obj), allow_nan=False, **kwargs)


def dump_line(obj: Any) -> str:
    """One JSON Lines record (strict, compact, newline-terminated)."""
    return dumps(obj) + "\n"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(text: str) -> Any:
    """Parse ``text`` refusing ``NaN``/``Infinity`` (as strict parsers do); for tests and checks."""
    return json.loads(text, parse_constant=_refuse_constant)
