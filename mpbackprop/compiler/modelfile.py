"""Load a network from a ``MODEL.py`` file, the input of ``mpbackprop compile``.

A model file is an ordinary Python file that defines

* ``model``, a ``torch.nn.Module``, or ``build_model()``, a function returning one
  (``model`` wins when both exist); and
* ``INPUT_SHAPE``, the per-sample input shape without the batch axis, e.g. ``(1, 8, 8)``
  (not needed when the caller passes ``input_shape``).

``attr`` picks another name instead of ``model``/``build_model``: a module object or a
zero-argument callable (function or class) returning one.

The file runs as a fresh module under a unique name (``_mpbackprop_model_<stem>_<n>``), so
two files with the same stem, or a file named like an installed package (``torch.py``),
never collide; its directory is on ``sys.path`` only while it runs, so it may import
sibling helper files. No bytecode is written next to it. The module stays registered in
``sys.modules`` under its unique name after a successful load, as after an import, so that
classes defined in the file can be pickled and their source found; a failed load removes it.

Whatever the file prints while it runs (and while ``build_model()`` runs) goes to stderr, not
stdout, so that commands whose stdout is data (``verify --json``) stay parseable; the CLI keeps
:func:`model_output_to_stderr` on while the model's ``forward`` runs too.

Every failure raises :class:`~mpbackprop.errors.ModelFileError` with one line that names
the file (and line, where there is one) and says what to do.
"""

from __future__ import annotations

import contextlib
import itertools
import re
import sys
import traceback
import types
from collections.abc import Iterator, Mapping, Set
from pathlib import Path
from typing import Any

import torch.nn as nn

from ..errors import ModelFileError, first_line

__all__ = ["load_model", "model_output_to_stderr", "parse_shape", "run_model_file"]

_DEFAULT_NAMES = ("model", "build_model")
_counter = itertools.count()
_SHAPE_EXAMPLE = "e.g. INPUT_SHAPE = (1, 8, 8)"


@contextlib.contextmanager
def model_output_to_stderr() -> Iterator[None]:
    """Send ``print`` output (``sys.stdout``) to ``sys.stderr`` while user model code runs."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _where(path: Path, display: str, exc: BaseException, fallback: int | None = None) -> str:
    """``display:line`` of the innermost traceback frame inside the model file."""
    target = str(path)
    lineno = fallback
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == target:
            lineno = frame.lineno
    return f"{display}:{lineno}" if lineno else display


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse a per-sample shape such as ``"1,8,8"`` (also ``"(1, 8, 8)"``, ``"1x8x8"``, ``"64"``).

    Raises
    ------
    ModelFileError
        ``text`` is not a list of positive integers.
    """
    raw = str(text).strip()
    body = raw
    if body[:1] in "([" and body[-1:] in ")]":
        body = body[1:-1]
    if "," in body:
        parts = [p.strip() for p in body.split(",")]
        if len(parts) > 1 and parts[-1] == "":  # "64," like a Python 1-tuple
            parts.pop()
    elif "x" in body or "×" in body:
        parts = [p.strip() for p in re.split("[x×]", body)]
    else:
        parts = body.split()
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise ModelFileError(
            f"input shape {raw!r} is not valid: give positive integers separated by commas, "
            "without the batch axis, e.g. 1,8,8"
        )
    return shape


def _as_shape(value: Any) -> tuple[int, ...] | None:
    """``value`` as a tuple of positive ints, or None when it is not one."""
    if isinstance(value, str):
        try:
            return parse_shape(value)
        except ModelFileError:
            return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (Mapping, Set)):  # iterating one gives keys / an arbitrary order, not a shape
        return None
    try:
        items = list(value)
    except TypeError:
        return None
    if not items:
        return None
    out = []
    for item in items:
        if isinstance(item, bool) or not hasattr(item, "__index__"):
            return None
        n = item.__index__()
        if n <= 0:
            return None
        out.append(int(n))
    return tuple(out)


def run_model_file(path: str | Path) -> types.ModuleType:
    """Execute a model file and return it as a module (see the module docstring).

    Raises
    ------
    ModelFileError
        The file is missing, not a ``.py`` file, unreadable, has a syntax error, or raises.
    """
    display = str(path)
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"{display}: no such file; give the path of a Python file that defines "
                             "`model` or `build_model()`")
    if path.is_dir():
        raise ModelFileError(f"{display}: is a directory; give a Python file that defines `model` or "
                             "`build_model()`")
    if path.suffix != ".py":
        raise ModelFileError(f"{display}: not a Python file (expected a .py file that defines `model` or "
                             "`build_model()`)")
    path = path.resolve()
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise ModelFileError(f"{display}: cannot read it ({exc.strerror or exc})") from exc
    try:
        code = compile(source, str(path), "exec", dont_inherit=True)
    except SyntaxError as exc:
        line = f":{exc.lineno}" if exc.lineno else ""
        raise ModelFileError(
            f"{display}{line}: {type(exc).__name__}: {exc.msg}; fix the model file"
        ) from exc
    except ValueError as exc:  # e.g. null bytes in the source
        raise ModelFileError(f"{display}: cannot compile it ({exc}); is it a Python file?") from exc

    stem = re.sub(r"\W", "_", path.stem)
    name = f"_mpbackprop_model_{stem}_{next(_counter)}"
    module = types.ModuleType(name)
    module.__file__ = str(path)
    sys.modules[name] = module
    folder = str(path.parent)
    sys.path.insert(0, folder)
    try:
        with model_output_to_stderr():
            exec(code, module.__dict__)  # noqa: S102 - running the user's model file is the point
    except (Exception, SystemExit) as exc:
        sys.modules.pop(name, None)
        raise ModelFileError(
            f"{_where(path, display, exc)}: {first_line(exc, typed=True)} (raised while running the model file)"
        ) from exc
    finally:
        try:
            sys.path.remove(folder)
        except ValueError:  # pragma: no cover - the file removed it itself
            pass
    return module


def _module_names(module: types.ModuleType) -> list[str]:
    """Names in ``module`` bound to nn.Module objects, or to nn.Module classes defined there."""
    found = []
    for key, value in vars(module).items():
        if key.startswith("_"):
            continue
        if isinstance(value, nn.Module):
            found.append(key)
        elif (isinstance(value, type) and issubclass(value, nn.Module)
              and value.__module__ == module.__name__):
            found.append(f"{key} (class)")
    return found


def _resolve(module: types.ModuleType, path: Path, display: str, attr: str | None) -> nn.Module:
    if attr is not None:
        if not hasattr(module, attr):
            names = _module_names(module)
            have = f"its torch.nn.Module names are: {', '.join(names)}" if names else \
                "it defines no torch.nn.Module"
            raise ModelFileError(f"{display} has no attribute {attr!r}; {have}")
        key = attr
    else:
        key = next((k for k in _DEFAULT_NAMES if hasattr(module, k)), None)
        if key is None:
            names = _module_names(module)
            if names:
                hint = f"it defines {', '.join(names)}; pick one with --attr NAME or add `model = ...`"
            else:
                hint = ("it defines no torch.nn.Module at all; add `model = nn.Sequential(...)` or "
                        "`def build_model(): ...`")
            raise ModelFileError(f"{display} defines neither `model` nor `build_model()`: {hint}")
    obj = getattr(module, key)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise ModelFileError(
            f"{display}: `{key}` is a {type(obj).__name__}, not a torch.nn.Module or a function returning one"
        )
    code = getattr(obj, "__code__", None)
    try:
        with model_output_to_stderr():
            built = obj()
    except (Exception, SystemExit) as exc:
        where = _where(path, display, exc, fallback=getattr(code, "co_firstlineno", None))
        raise ModelFileError(f"{where}: {key}() raised {first_line(exc, typed=True)}") from exc
    if not isinstance(built, nn.Module):
        raise ModelFileError(
            f"{display}: {key}() returned a {type(built).__name__}, not a torch.nn.Module"
        )
    return built


def load_model(
    path: str | Path, attr: str | None = None, input_shape: tuple[int, ...] | None = None
) -> tuple[nn.Module, tuple[int, ...]]:
    """Run a model file and return its network and per-sample input shape.

    Parameters
    ----------
    path : path
        A ``.py`` file defining ``model`` or ``build_model()`` and ``INPUT_SHAPE``.
    attr : str, optional
        Another name to take the network from: a module object or a zero-argument callable.
    input_shape : tuple of int, optional
        Per-sample input shape; overrides the file's ``INPUT_SHAPE``.

    Returns
    -------
    (nn.Module, tuple of int)

    Raises
    ------
    ModelFileError
        With one line naming the file and what to do.
    """
    display = str(path)
    module = run_model_file(path)
    resolved = Path(module.__file__)  # type: ignore[arg-type]
    model = _resolve(module, resolved, display, attr)
    if input_shape is not None:
        shape = _as_shape(input_shape)
        if shape is None:
            raise ModelFileError(
                f"input shape {input_shape!r} for {display} is not valid: give positive integers without "
                "the batch axis, e.g. 1,8,8"
            )
        return model, shape
    if not hasattr(module, "INPUT_SHAPE"):
        raise ModelFileError(
            f"{display} does not define INPUT_SHAPE: add one ({_SHAPE_EXAMPLE}, per sample, no batch axis) "
            "or pass --input-shape"
        )
    value = module.INPUT_SHAPE
    shape = _as_shape(value)
    if shape is None:
        text = repr(value)
        text = text if len(text) <= 60 else text[:57] + "..."
        kind = f"is a {type(value).__name__}, " if isinstance(value, (Mapping, Set)) else ""
        raise ModelFileError(
            f"{display}: INPUT_SHAPE = {text} {kind}is not a shape: use a tuple of positive ints per sample, "
            f"without the batch axis, {_SHAPE_EXAMPLE}"
        )
    return model, shape
