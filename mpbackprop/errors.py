"""Library errors. Each carries one line a user can act on; the CLI prints it and exits 2."""

from __future__ import annotations


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
