"""The table format of the hostile-input tests (``tests/test_hostile.py``).

Each :class:`Case` is one command line a careless or hostile user might type, with the exit
status and a fragment of the one ``Error: ...`` line it must produce. Cases are grouped by area
in lists named ``CASES`` in ``tests/hostile_<area>.py``; ``test_hostile.py`` runs them all as
one parametrised table.

``argv`` and ``env`` values may contain ``{tmp}`` (a fresh directory per case) and ``{examples}``
(the repository's ``examples/``); ``files`` are written under ``{tmp}`` first; ``setup`` gets the
directory for anything that needs Python (a run directory, a corrupt checkpoint, ...).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mpbackprop.cli import EXIT_BAD_INPUT as BAD_INPUT  # the exit status of a refusal of bad input

__all__ = ["BAD_INPUT", "Case"]


@dataclass
class Case:
    id: str
    argv: list[str]
    code: int
    fragment: str
    files: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    setup: Callable[[Path], None] | None = None
    one_line: bool = True  # stderr must be exactly one "Error: ..." line
