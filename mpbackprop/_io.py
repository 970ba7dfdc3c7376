"""Atomic file writes: nothing half-written survives a crash or Ctrl-C."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

__all__ = ["atomic_write", "atomic_torch_save", "is_disk_full"]

#: ``errno`` values of a write that failed for lack of space: a full disk, or a full quota.
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is a write that failed for lack of space (``ENOSPC``, ``EDQUOT``)."""
    return isinstance(exc, OSError) and exc.errno in _DISK_FULL


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    The file gets the usual ``0666 & ~umask`` permissions (``mkstemp`` alone gives 0600).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically, through Python file I/O: a full disk then raises
    ``OSError(ENOSPC)`` (torch's own file writer reports it as a bare ``RuntimeError``)."""
    import torch

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)

    return atomic_write(path, write)


def replace_section(text: str, start: str, end: str, body: list[str], heading: str) -> str:
    """Replace the lines between the markers ``start`` and ``end`` (``body`` includes both); if the
    markers are missing, append ``body`` under a new ``## heading``. For generated README sections."""
    if start in text and end in text:
        return text[:text.index(start)] + "\n".join(body) + text[text.index(end) + len(end):]
    return text.rstrip() + f"\n\n## {heading}\n\n" + "\n".join(body) + "\n"
