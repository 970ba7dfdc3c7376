"""Stop requests (SIGINT, SIGTERM) that wait for the end of the current outer step.

A run saved in the middle of an outer step would hold a half-advanced inner state and RNG, and
a step whose validation was cut short would lose its metrics line: ``--resume`` could not
continue exactly. So the first SIGINT (Ctrl-C) or SIGTERM only sets a flag; the loop finishes
the step, saves and stops. A second signal stops at once, without saving: the last checkpoint
stays as it was (every file is written atomically). A repeat within :data:`REPEAT_AFTER_S`
of the first counts as the same request — a terminal's Ctrl-C reaches ``torchrun`` and its
workers together, and ``torchrun`` then passes the signal on to the workers once more.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

__all__ = ["StopRequests", "REPEAT_AFTER_S", "SIGNALS"]

#: Signals that ask a run to stop.
SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: A second signal stops at once only if it comes this many seconds after the first.
REPEAT_AFTER_S = 1.0


class StopRequests:
    """Context manager: while active, SIGINT/SIGTERM set :attr:`signum` instead of interrupting;
    a second one (after :data:`REPEAT_AFTER_S`) raises ``KeyboardInterrupt`` where the program is.

    Outside the main thread Python delivers no signals to handlers, so nothing is installed there.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_at = 0.0
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum, self._first_at = signum, time.monotonic()
        elif time.monotonic() - self._first_at >= REPEAT_AFTER_S:
            self._restore()
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name} again: stopping at once")
