"""The old path of :mod:`mpbackprop.compiler.modelfile`, kept for files that import it
(``from mpbackprop.modelfile import load_model``)."""

from .compiler.modelfile import load_model, model_output_to_stderr, parse_shape, run_model_file

__all__ = ["load_model", "model_output_to_stderr", "parse_shape", "run_model_file"]
