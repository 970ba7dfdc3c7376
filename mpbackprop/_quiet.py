"""Import DGL without its banners and warnings.

DGL 2.1 prints a backend banner when ``DGLBACKEND`` is unset and emits
deprecation warnings from its graphbolt sub-package on import. Users of
mpbackprop should see neither, so every module imports DGL through here.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings

os.environ.setdefault("DGLBACKEND", "pytorch")

with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(
    io.StringIO()
):
    warnings.simplefilter("ignore")
    import dgl  # noqa: E402
    import dgl.function as fn  # noqa: E402
    import dgl.ops as ops  # noqa: E402

__all__ = ["dgl", "fn", "ops"]
