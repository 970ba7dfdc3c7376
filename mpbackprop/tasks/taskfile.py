"""Task files: your own datasets and models as a task family, for ``meta-train --task FILE.py``.

A task file is a Python file run as a model file for ``compile`` is (:mod:`mpbackprop.compiler.modelfile`:
a fresh module, its folder importable while it runs, its prints on stderr). It defines

``DATASETS``
    ``{name: data}``; ``data`` is ``(x, y)`` arrays, or a function of no arguments returning them.
    ``x`` is ``(n, *input_shape)``; ``y`` holds integer class ids ``(n,)`` (classification, cross-entropy)
    or float targets ``(n,)``/``(n, k)`` (regression, MSE). :func:`load_arrays` reads ``.npz``/``.csv``.
``MODELS``
    ``{name: build}``; ``build(input_shape, num_outputs)`` returns a network ``mpbackprop.compile``
    accepts. Its initialisation comes from torch's global RNG, which is seeded per task.
``BATCH_SIZES`` (optional, default ``(32,)``)
    Batch sizes a task draws from.
``LOSS`` (optional)
    ``"cross_entropy"``, ``"mse"`` or ``loss(output, target) -> scalar`` (default: from ``y``'s kind).
``SCALES`` (optional)
    ``{"input": (lo, hi), "init": (lo, hi)}``: each task multiplies its inputs / initial weights by a
    factor drawn log-uniformly from the range (task augmentation).
``NAME`` (optional)
    The family's name (default: the file's stem).

How tasks vary with the seed is as for the built-in families: each task draws a dataset, a model and
a batch size, an initialisation seed and a data seed (the train/validation split and the batch
order), each split (``train``/``valid``/``heldout``) from its own seed range, so held-out tasks are
never seen in meta-training. The file's datasets and models enter the one registry of
:mod:`mpbackprop.tasks` as ``<family>:<name>``.

A run records the file's absolute path and :func:`fingerprint` (SHA-256 of the file and of the data
files it read through :func:`load_arrays`); loading it again with that fingerprint refuses a file
that has moved or changed (:class:`~mpbackprop.errors.TaskFileError`).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import registry as tasks
from ..errors import ModelFileError, TaskFileError, first_line
from ..compiler.modelfile import run_model_file

__all__ = ["load_arrays", "load_task_file", "TaskFile"]

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_reading: list[list[tuple[str, str]]] = []  # data files read by load_arrays while a task file runs
_base: list[Path] = []  # the folder of the task file running


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_arrays(path: str | Path, x: str | list[str] = "x", y: str = "y") -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` from a ``.npz`` file (arrays named ``x`` and ``y``) or a ``.csv`` file (a header row of
    column names: ``y`` the target column, ``x`` the feature columns, default all others).

    A relative path is taken from the folder of the task file being loaded (else the working
    directory). Raises :class:`TaskFileError` for a missing file, a missing array/column or a
    value that is not a number.
    """
    p = Path(path)
    if not p.is_absolute() and _reading and _base:
        p = _base[-1] / p
    if not p.is_file():
        raise TaskFileError(f"{path}: no such data file")
    try:
        if p.suffix == ".npz":
            with np.load(p, allow_pickle=False) as data:
                names = [x] if isinstance(x, str) else list(x)
                missing = [n for n in [*names, y] if n not in data.files]
                if missing:
                    raise TaskFileError(f"{path}: no array {missing[0]!r} (has {', '.join(data.files)})")
                xs = np.concatenate([data[n].reshape(len(data[n]), -1) for n in names], 1) if len(names) > 1 \
                    else data[names[0]]
                ys = data[y]
        elif p.suffix == ".csv":
            header = p.read_text().splitlines()[0].split(",")
            header = [h.strip() for h in header]
            if y not in header:
                raise TaskFileError(f"{path}: no column {y!r} in the header ({', '.join(header)})")
            cols = [c for c in header if c != y] if x == "x" else ([x] if isinstance(x, str) else list(x))
            table = np.loadtxt(p, delimiter=",", skiprows=1, ndmin=2)
            xs = table[:, [header.index(c) for c in cols]]
            ys = table[:, header.index(y)]
            if np.all(ys == np.round(ys)):
                ys = ys.astype(np.int64)
        else:
            raise TaskFileError(f"{path}: expected a .npz or .csv file")
    except ValueError as exc:
        raise TaskFileError(f"{path}: cannot read it ({first_line(exc)})") from None
    if _reading:
        _reading[-1].append((str(p.resolve()), _sha256(p)))
    return np.asarray(xs), np.asarray(ys)


@dataclass
class TaskFile:
    """A loaded task file: its family (registered in :data:`mpbackprop.tasks.FAMILIES`), path and fingerprint."""

    family: tasks.TaskFamily
    path: Path
    sha256: str
    data_files: tuple[tuple[str, str], ...]


_LOADED: dict[Path, TaskFile] = {}


def fingerprint(source: bytes, data_files: tuple[tuple[str, str], ...]) -> str:
    h = hashlib.sha256(source)
    for name, sha in sorted(data_files):
        h.update(f"\0{name}\0{sha}".encode())
    return h.hexdigest()


def load_task_file(path: str | Path, sha256: str | None = None) -> TaskFile:
    """Run the task file at ``path`` and register its family, datasets and models (again only when the
    file or its data changed); with ``sha256``, refuse a file whose fingerprint differs."""
    display = str(path)
    p = Path(path).expanduser()
    if not p.is_file():
        moved = " (recorded by the run: move it back, or start a new run)" if sha256 else ""
        raise TaskFileError(f"{display}: no such task file{moved}")
    if p.suffix != ".py":
        raise TaskFileError(f"{display}: not a Python file (a task file is a .py file defining DATASETS and MODELS)")
    p = p.resolve()
    source = p.read_bytes()
    known = _LOADED.get(p)
    if known is not None and _unchanged(known, source):
        loaded = known
    else:
        loaded = _run(p, display, source)
    if sha256 is not None and loaded.sha256 != sha256:
        raise TaskFileError(f"{display}: the task file or its data changed since the run recorded it (sha256 "
                            f"{sha256[:12]}... then, {loaded.sha256[:12]}... now); restore it, or start a new run")
    return loaded


def _unchanged(known: TaskFile, source: bytes) -> bool:
    try:
        data = tuple((name, _sha256(Path(name))) for name, _ in known.data_files)
    except OSError:
        return False
    return fingerprint(source, data) == known.sha256


def _run(p: Path, display: str, source: bytes) -> TaskFile:
    _reading.append([])  # loaders called while the file runs, or after (DATASETS' functions), are recorded
    _base.append(p.parent)
    try:
        return _register(p, display, source)
    finally:
        _reading.pop()
        _base.pop()


def _register(p: Path, display: str, source: bytes) -> TaskFile:
    try:
        module = run_model_file(p)
    except ModelFileError as exc:
        raise TaskFileError(str(exc).replace("model file", "task file")) from None
    ns = vars(module)
    name = ns.get("NAME", re.sub(r"[^A-Za-z0-9_.-]", "_", p.stem))
    if not isinstance(name, str) or not _NAME.match(name):
        raise TaskFileError(f"{display}: NAME must be 1-64 letters, digits, '_', '.' or '-' (got {name!r})")
    previous = tasks.FAMILIES.get(name)
    if previous is not None and not previous.source:
        raise TaskFileError(f"{display}: {name!r} is a built-in task family; set NAME = '...' to another name")
    datasets = _table(ns, "DATASETS", display, "{'name': (x, y)}")
    models = _table(ns, "MODELS", display, "{'name': build(input_shape, num_outputs)}")
    batch_sizes = ns.get("BATCH_SIZES", (32,))
    if (not isinstance(batch_sizes, (list, tuple)) or not batch_sizes
            or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in batch_sizes)):
        raise TaskFileError(f"{display}: BATCH_SIZES must be a non-empty list of positive integers "
                            f"(got {batch_sizes!r})")
    loss = ns.get("LOSS")
    if loss is not None and not callable(loss) and loss not in ("cross_entropy", "mse"):
        raise TaskFileError(f"{display}: LOSS must be 'cross_entropy', 'mse' or a function (got {loss!r})")
    scales = _scales(ns.get("SCALES", {}), display)

    if previous is not None:  # a changed file: drop what its last version registered
        tasks.forget([*previous.datasets, *previous.archs])
    entries = {}
    for key, data in datasets.items():
        x, y, kind = _arrays(data, f"{display}: DATASETS[{key!r}]")
        entries[f"{name}:{key}"] = (x, y, kind)
        tasks.register_dataset(f"{name}:{key}", x.shape[1:], kind, lambda x=x, y=y: (x, y), loss)
    for key, build in models.items():
        if not callable(build):
            raise TaskFileError(f"{display}: MODELS[{key!r}] must be a function build(input_shape, num_outputs)")
        tasks.register_arch(f"{name}:{key}", _builder(build))
    data_files = tuple(_reading[-1])
    family = tasks.TaskFamily(name, tuple(entries), archs=tuple(f"{name}:{k}" for k in models),
                              batch_sizes=tuple(int(b) for b in batch_sizes), scales=scales,
                              description=f"task file {p}", source=str(p),
                              sha256=fingerprint(source, data_files))
    _check_models(family, display)
    tasks.register_family(family)
    loaded = _LOADED[p] = TaskFile(family, p, family.sha256, data_files)
    return loaded


def _table(ns: dict[str, Any], key: str, display: str, example: str) -> dict[str, Any]:
    table = ns.get(key)
    if not isinstance(table, dict) or not table:
        raise TaskFileError(f"{display}: define {key} as a non-empty dict, e.g. {key} = {example}")
    for name in table:
        if not isinstance(name, str) or not _NAME.match(name):
            raise TaskFileError(f"{display}: {key} names must be 1-64 letters, digits, '_', '.' or '-' (got {name!r})")
    return table


def _scales(value: Any, display: str) -> dict[str, tuple[float, float]]:
    ok = isinstance(value, dict) and set(value) <= {"input", "init"}
    out = {}
    for key, rng in (value.items() if ok else []):
        try:
            lo, hi = (float(v) for v in rng)
        except (TypeError, ValueError):
            ok = False
            break
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo <= hi):
            ok = False
            break
        out[key] = (lo, hi)
    if not ok:
        raise TaskFileError(f"{display}: SCALES must map 'input' and/or 'init' to a range (lo, hi) with "
                            f"0 < lo <= hi (got {value!r})")
    return out


def _arrays(data: Any, where: str) -> tuple[np.ndarray, np.ndarray, str]:
    """``(x float64, y, kind)`` of one dataset; ``y`` int64 ``(n,)`` or float64 ``(n, k)``."""
    if callable(data):
        try:
            data = data()
        except TaskFileError:
            raise
        except Exception as exc:  # the user's loader
            raise TaskFileError(f"{where}: its loader raised {first_line(exc, typed=True)}") from None
    try:
        x, y = data
        x = np.asarray(x.detach().cpu() if hasattr(x, "detach") else x)
        y = np.asarray(y.detach().cpu() if hasattr(y, "detach") else y)
    except (TypeError, ValueError):
        raise TaskFileError(f"{where}: expected a pair of arrays (x, y) or a function returning one") from None
    if x.ndim < 2 or len(x) != len(y) or len(x) < 4 or not np.issubdtype(x.dtype, np.number):
        raise TaskFileError(f"{where}: x must be a numeric array (n, *input_shape) and y have n rows, n >= 4 "
                            f"(got x {x.shape} {x.dtype}, y {y.shape})")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise TaskFileError(f"{where}: x has values that are not finite")
    if np.issubdtype(y.dtype, np.integer):
        if y.ndim != 1 or y.min() < 0:
            raise TaskFileError(f"{where}: integer y must be class ids 0..C-1 of shape (n,)")
        return x, y.astype(np.int64), "classification"
    if not np.issubdtype(y.dtype, np.floating) or y.ndim > 2 or not np.isfinite(y).all():
        raise TaskFileError(f"{where}: y must be integer class ids or finite float targets (n,) or (n, k)")
    return x, y.astype(np.float64).reshape(len(y), -1), "regression"


def _builder(build: Callable[..., Any]) -> Callable[[tasks.TaskSpec, tuple[int, ...], int], Any]:
    def arch(spec: tasks.TaskSpec, shape: tuple[int, ...], num_outputs: int) -> Any:
        return build(tuple(shape), int(num_outputs))

    return arch


def _check_models(family: tasks.TaskFamily, display: str) -> None:
    """Every model must build and compile on every dataset (one clear line if not)."""
    import torch
    import torch.nn as nn

    from ..graph.network import compile

    for dataset in family.datasets:
        shape, kind = tasks.DATASETS[dataset]
        _, y = tasks._raw(dataset)
        n_out = int(y.max()) + 1 if kind == "classification" else int(y.shape[1])
        for arch in family.archs:
            spec = tasks.TaskSpec(dataset, arch, (), "")
            try:
                with torch.random.fork_rng(devices=[]):  # build_model seeds torch: leave the caller's RNG be
                    model = spec.build_model(n_out)
                if not isinstance(model, nn.Module):
                    raise TypeError(f"it returned a {type(model).__name__}, not a torch.nn.Module")
                compile(model, shape)
            except Exception as exc:
                raise TaskFileError(f"{display}: MODELS[{arch.split(':', 1)[1]!r}] on {dataset.split(':', 1)[1]!r} "
                                    f"(input {shape}, {n_out} outputs): {first_line(exc)}") from None
