"""Measuring rules: the evaluation protocol (tuned baselines, statistics, plots), ``evaluate``'s run, analysis,
verify, TensorBoard.

``plot_curves`` here is the protocol's (:func:`~mpbackprop.evaluation.protocol.plot_curves`), and ``verify``
the function (:func:`~mpbackprop.evaluation.verify.verify`); ``mpbackprop.evaluation.analysis`` and
``mpbackprop.evaluation.verify`` name the modules in ``from ... import``.
"""

from .protocol import (DIVERGED_LOSS, LONG_FAMILIES, LONG_MULTIPLES, METHODS, SUITE_METHODS, SUITES, RunCurve,
                       TaskResult, ci95, combine_task_cis, curve_band, evaluate, format_report, get_family,
                       is_diverged, picture_format, plot_curves, resolve_rule, run_method, suite_tasks, summarize,
                       tune_lr)
from .run import (SUITE_CHOICES, TASK_FILE_SUITES, EvaluationRun, check_suite, report_lines, run_suites, task_family,
                  write_plots, write_results, write_tensorboard)
from .analysis import Analysis, LayerSeries, analyze, plot_alignment
from .verify import DTYPES, RULES, TOLERANCES, VerifyReport, verify
from .tensorboard import TensorBoard

__all__ = [
    # protocol
    "DIVERGED_LOSS", "LONG_FAMILIES", "LONG_MULTIPLES", "METHODS", "SUITE_METHODS", "SUITES", "RunCurve", "TaskResult",
    "ci95", "combine_task_cis", "curve_band", "evaluate", "format_report", "is_diverged", "picture_format",
    "plot_curves", "resolve_rule", "run_method", "suite_tasks", "summarize", "tune_lr",
    # run
    "SUITE_CHOICES", "TASK_FILE_SUITES", "EvaluationRun", "check_suite", "report_lines", "run_suites", "task_family",
    "write_plots", "write_results", "write_tensorboard",
    # analysis, verify, tensorboard
    "Analysis", "LayerSeries", "analyze", "plot_alignment", "DTYPES", "RULES", "TOLERANCES", "VerifyReport", "verify",
    "TensorBoard",
]
