"""Library errors. Each carries one line a user can act on; the CLI prints it and exits 2."""

from __future__ import annotations

__all__ = ["MPBackpropError", "ModelFileError", "UnsupportedOpError", "ShapeError", "GraphFileError", "TaskFileError",
           "first_line"]


def first_line(what: BaseException | str, typed: bool = False) -> str:
    """The first non-blank line of a message, stripped: what a one-line refusal shows of it.

    For an exception, the first line of its message, or its class name when it has none; with
    ``typed``, the class name in front (``ValueError: ...``). For a string, ``""`` when it is blank.
    """
    line = next((ln.strip() for ln in str(what).splitlines() if ln.strip()), "")
    if not isinstance(what, BaseException):
        return line
    name = type(what).__name__
    if typed:
        return f"{name}: {line}" if line else name
    return line or name


class MPBackpropError(Exception):
    """Base class of every error mpbackprop raises on purpose."""


class ModelFileError(MPBackpropError):
    """A MODEL.py file could not be read, executed, or does not define a model."""


class UnsupportedOpError(MPBackpropError):
    """The traced network contains an operation the compiler cannot express as a graph."""


class ShapeError(MPBackpropError):
    """The input shape does not fit the network."""


class GraphFileError(MPBackpropError):
    """A saved graph or checkpoint file is missing, corrupt or of another kind."""


class TaskFileError(MPBackpropError):
    """A task file (``meta-train --task``) could not be run, defines no usable tasks, or has moved or
    changed since a run recorded it."""
