"""Compiling a model: the torch.fx trace into blocks and weight uses, its refusals, the forward self-check,
the memory budget, model files."""

from .budget import DEFAULT_LIMIT_GB, ENV_VAR, GraphEstimate, GraphTooLargeError, check_budget, estimate, limit_gb
from .modelfile import load_model, model_output_to_stderr, parse_shape, run_model_file
from .selfcheck import TOLERANCE, ForwardMismatchError, check_forward
from .trace import SUPPORTED, LayerEdges, Trace, check_input_shape, symbolic_trace, trace_module
from .tracecheck import MutationWatch, check_autograd_semantics, enclosing_autograd_function, grad_mode_meta

__all__ = [
    # trace
    "SUPPORTED", "LayerEdges", "Trace", "check_input_shape", "symbolic_trace", "trace_module",
    # tracecheck
    "MutationWatch", "check_autograd_semantics", "enclosing_autograd_function", "grad_mode_meta",
    # selfcheck
    "TOLERANCE", "ForwardMismatchError", "check_forward",
    # budget
    "DEFAULT_LIMIT_GB", "ENV_VAR", "GraphEstimate", "GraphTooLargeError", "check_budget", "estimate", "limit_gb",
    # modelfile
    "load_model", "model_output_to_stderr", "parse_shape", "run_model_file",
]
