"""mpbackprop: learning the backward pass by message passing on DGL heterographs.

A target ``torch.nn.Module`` is compiled into a heterogeneous DGL graph with node types
``neuron`` and ``param`` (:func:`compile`); the backward pass runs as message passing on
that graph with exact, feedback-alignment or learned rules.
"""

from __future__ import annotations

from . import _quiet  # noqa: F401  (sets DGLBACKEND and silences DGL's import chatter first)
from .errors import GraphFileError, ModelFileError, MPBackpropError, ShapeError, UnsupportedOpError
# graph/ before anything that uses the compiler: graph/__init__ loads activations and layers, which the
# compiler builds on, before schema and network bring in compiler/
from .graph.activations import Activation
from .graph.layers import Layer, ParamTensor
from .graph.network import CompiledNetwork, ForwardRecord, compile, load
from . import rules, tasks
from .engine.inner_step import InnerStep
from .engine.trainer import Trainer
from .evaluation.verify import verify

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "Activation",
    "CompiledNetwork",
    "ForwardRecord",
    "InnerStep",
    "GraphFileError",
    "Layer",
    "ModelFileError",
    "MPBackpropError",
    "ParamTensor",
    "ShapeError",
    "UnsupportedOpError",
    "compile",
    "load",
    "rules",
    "tasks",
    "Trainer",
    "verify",
]
