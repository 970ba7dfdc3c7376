"""The command line: click commands (``mpbackprop = "mpbackprop.cli:main"``) and the text they print."""

from .commands import (EXIT_BAD_INPUT, EXIT_FAILED, EXIT_INTERNAL, EXIT_INTERRUPTED, FORMATS, META_SEED, SEED, THREADS,
                       CLIError, CLIState, IntBetween, PlotFile, PositiveFloat, ShapeParam, main, report_errors)
from .tables import (analyze_lines, compile_lines, edge_breakdown, format_table, inspect_lines, shape_text,
                     verify_lines)

__all__ = [
    # commands
    "EXIT_BAD_INPUT", "EXIT_FAILED", "EXIT_INTERNAL", "EXIT_INTERRUPTED", "FORMATS", "META_SEED", "SEED", "THREADS",
    "CLIError", "CLIState", "IntBetween", "PlotFile", "PositiveFloat", "ShapeParam", "main", "report_errors",
    # tables
    "analyze_lines", "compile_lines", "edge_breakdown", "format_table", "inspect_lines", "shape_text", "verify_lines",
]
