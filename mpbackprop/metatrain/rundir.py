"""The run directory: who may write it, what counts as a run, and writes that keep it resumable.

* :class:`RunLock` — ``fcntl.flock`` on ``<run>/.lock`` (the holder's pid inside), held by the
  writing process for the whole run, so two processes never write one run; the second is
  refused at once, with the holder's pid.
* :func:`holds_run` / :func:`clear_run` — a directory with any of :data:`RUN_FILES` holds a run;
  starting a new run there needs ``--overwrite``, which removes exactly those files.
* :func:`read_metrics` — ``metrics.jsonl`` as records; a torn last line (a write cut off when
  the run stopped) is dropped and reported, any other damage refused with file and line.
* :func:`append_line` — an append that leaves the file as it was when it fails.
* :func:`disk_full_guard` — a write that fails because the disk is full becomes one line saying
  which file and at which step the run is still intact.

Every other file of a run is written with :func:`mpbackprop._io.atomic_write` (write, then
rename), so a failed write leaves the previous version in place.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path
from typing import Any, Iterator

from .._io import is_disk_full
from ..errors import MPBackpropError, first_line

__all__ = ["RUN_FILES", "RunDirectoryError", "DiskFullError", "RunLock", "holds_run", "clear_run", "read_metrics",
           "append_line", "disk_full_guard"]

#: The files a meta-training run writes (``--overwrite`` removes exactly these).
RUN_FILES = ("config.json", "state.pt", "rule.pt", "best.pt", "metrics.jsonl", "meta_loss.png")
LOCK_NAME = ".lock"


class RunDirectoryError(MPBackpropError):
    """The run directory cannot be used as asked (in use, holds another run, damaged)."""


class DiskFullError(MPBackpropError):
    """A write of the run failed for lack of space; the last complete checkpoint is intact."""


class RunLock:
    """An exclusive, non-blocking lock on a run directory (released by :meth:`release` or when
    the process ends, however it ends)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (creating the directory) or raise :class:`RunDirectoryError` naming the holder."""
        if self._fd is not None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirectoryError(f"{self.directory} is in use by another meta-train run (pid {holder}); "
                                    "wait for it to end or stop it, or choose another --out") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the only descriptor releases the flock

    def __del__(self) -> None:
        self.release()


def holds_run(directory: Path) -> bool:
    """Whether ``directory`` holds (part of) a meta-training run."""
    return any((directory / name).exists() for name in RUN_FILES)


def clear_run(directory: Path) -> None:
    """Remove the run's files from ``directory`` (nothing else in it)."""
    for name in RUN_FILES:
        (directory / name).unlink(missing_ok=True)


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], str | None]:
    """The records of ``metrics.jsonl`` and a note if a torn last line was dropped.

    Every complete line is one JSON object with an integer ``step``. A last line without its
    newline that does not parse is what a write cut off by a crash, a kill or a full disk leaves:
    it is dropped. Anything else that does not parse is refused, naming the file and the line.
    Files of older versions (``NaN`` for missing values) still read.
    """
    if not path.is_file():
        return [], None
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")  # the last item is "" when the file ends with a newline
    rows: list[dict[str, Any]] = []
    note = None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
                raise ValueError("not a metrics record")
        except ValueError as exc:
            if number == len(lines):  # no newline after it: a torn write
                note = f"{path}: dropped its last line {number} (cut off when the run stopped)"
                break
            reason = first_line(str(exc)) or "not JSON"
            raise RunDirectoryError(f"{path}: line {number} is damaged ({reason}); repair or delete that line, "
                                    "or start the run anew with --overwrite") from None
        rows.append(row)
    return rows, note


def append_line(path: Path, line: str) -> None:
    """Append ``line`` to ``path``; if the write fails (disk full, ...), the file is cut back to
    its previous length before the error propagates, so no torn line stays behind."""
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def disk_full_guard(path: Path, intact_step: int | None) -> Iterator[None]:
    """Turn a full disk (``ENOSPC``, ``EDQUOT``) while writing ``path`` into a :class:`DiskFullError`
    that says where the run can continue from."""
    try:
        yield
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        where = (f"the run is intact at step {intact_step} (continue with --resume once there is space)"
                 if intact_step is not None else "no checkpoint was written yet (start again once there is space)")
        raise DiskFullError(f"no space left on device writing {path}; {where}") from None
