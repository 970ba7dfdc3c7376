"""The compiled network: the heterograph schema, block metadata, CompiledNetwork, per-layer views, exports, pictures."""

# activations and layers first: the compiler (imported by schema and network) builds on them
from .activations import ACTIVATION_IDS, IDENTITY, Activation
from .layers import FIXED_KINDS, KINDS, WEIGHTED_KINDS, Layer, ParamTensor
from .schema import NEURON, PARAM, build_heterograph, frozen_feature, tensor_table
from .views import LayerView, build_views
from .network import CompiledNetwork, ForwardRecord, compile, load
from .exports import (FORMATS, GRAPHML_FORMAT, JSON_FORMAT, json_document, load_any, networkx_for_export, output_format,
                      read_graphml, read_json, write, write_graphml, write_json)
from .plotting import PlotError, check_plot_size, plot_network

__all__ = [
    # activations, layers
    "ACTIVATION_IDS", "IDENTITY", "Activation", "FIXED_KINDS", "KINDS", "WEIGHTED_KINDS", "Layer", "ParamTensor",
    # schema, views
    "NEURON", "PARAM", "build_heterograph", "frozen_feature", "tensor_table", "LayerView", "build_views",
    # network
    "CompiledNetwork", "ForwardRecord", "compile", "load",
    # exports
    "FORMATS", "GRAPHML_FORMAT", "JSON_FORMAT", "json_document", "load_any", "networkx_for_export", "output_format",
    "read_graphml", "read_json", "write", "write_graphml", "write_json",
    # plotting
    "PlotError", "check_plot_size", "plot_network",
]
