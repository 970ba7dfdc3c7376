"""Import DGL — quietly, and with whatever PyTorch is installed. Every module imports DGL through here.

DGL 2.1 (the last DGL on PyPI) prints a backend banner when ``DGLBACKEND`` is unset and emits
deprecation warnings from its graphbolt sub-package on import; users of mpbackprop should see
neither. Its graphbolt library is also built per PyTorch version (``libgraphbolt_pytorch_<v>.so``,
up to 2.2.1), so with a newer PyTorch ``import dgl`` fails inside ``dgl.graphbolt``. mpbackprop
never uses graphbolt (a data-loading library for large graphs): when — and only when — graphbolt
cannot load, DGL is imported again with an empty ``dgl.graphbolt`` in its place, without a word.
Any other failure to import DGL is raised as it is.

Attributes
----------
GRAPHBOLT : bool
    Whether DGL's own graphbolt loaded (False: the empty stand-in is in place).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import traceback
import types
import warnings

__all__ = ["dgl", "fn", "ops", "GRAPHBOLT"]

os.environ.setdefault("DGLBACKEND", "pytorch")


def _failed_in_graphbolt(exc: BaseException) -> bool:
    """Whether ``exc`` was raised while ``dgl.graphbolt`` was being imported."""
    marker = os.sep + os.path.join("dgl", "graphbolt") + os.sep
    return any(marker in frame.filename for frame in traceback.extract_tb(exc.__traceback__))


def _graphbolt_stand_in() -> types.ModuleType:
    """An empty ``dgl.graphbolt``; any attribute asked of it says why it is empty."""
    module = types.ModuleType("dgl.graphbolt", "Empty stand-in for DGL's graphbolt (mpbackprop._quiet).")

    def __getattr__(name: str) -> None:
        raise AttributeError(f"dgl.graphbolt could not load with this PyTorch and was left out by "
                             f"mpbackprop (which does not use it); no attribute {name!r}")

    module.__getattr__ = __getattr__  # type: ignore[method-assign]
    return module


def _forget_dgl() -> None:
    """Drop the modules of a failed, partial ``import dgl`` so the next import starts afresh."""
    for name in [n for n in sys.modules if n == "dgl" or n.startswith("dgl.")]:
        del sys.modules[name]


def _import() -> bool:
    """Import ``dgl``, ``dgl.function`` and ``dgl.ops``; return whether graphbolt loaded."""
    try:
        import dgl.function  # noqa: F401
        import dgl.ops  # noqa: F401
        return True
    except Exception as exc:  # graphbolt raises FileNotFoundError / ImportError / OSError
        if not _failed_in_graphbolt(exc):
            raise
    _forget_dgl()
    stand_in = sys.modules["dgl.graphbolt"] = _graphbolt_stand_in()
    import dgl.function  # noqa: F401,F811
    import dgl.ops  # noqa: F401,F811

    dgl.graphbolt = stand_in  # as an import would have bound it
    _relink_object_base()
    return False


def _relink_object_base() -> None:
    """Give the second import's ``dgl._ffi.object_generic`` the object base class of DGL's C core.

    The core (a C extension) registers its ``ObjectBase`` with ``object_generic`` once, when the
    extension initialises; Python does not initialise an extension module twice, so after
    :func:`_forget_dgl` the fresh ``object_generic`` would keep ``None`` and every DGL call that
    converts objects (``dgl.save_graphs``, …) would fail.
    """
    generic = sys.modules.get("dgl._ffi.object_generic")
    if generic is None or getattr(generic, "_CLASS_OBJECT_BASE", True) is not None:
        return
    for core in ("dgl._ffi._cy3.core", "dgl._ffi._ctypes.object"):
        base = getattr(sys.modules.get(core), "ObjectBase", None)
        if isinstance(base, type):
            generic._set_class_object_base(base)
            return


with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(
    io.StringIO()
):
    warnings.simplefilter("ignore")
    GRAPHBOLT = _import()
    import dgl  # noqa: E402
    import dgl.function as fn  # noqa: E402
    import dgl.ops as ops  # noqa: E402
