"""An evaluation run as ``mpbackprop evaluate`` makes it: suites planned, run, written, plotted.

:func:`task_family` picks the family tasks are built from (also for ``analyze``);
:func:`run_suites` runs every suite's tasks with a progress bar, writing ``results.json`` and
``report.txt`` after each task so that an interrupted run keeps what finished; :func:`write_plots`
and :func:`write_tensorboard` draw the curves. The protocol itself (methods, tuning, statistics)
is :mod:`mpbackprop.evaluation`'s.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import protocol as ev
from .._io import atomic_write
from .._json import dumps
from ..errors import TaskFileError, first_line
from ..rules import BackwardRule, UpdateRule

__all__ = ["TASK_FILE_SUITES", "SUITE_CHOICES", "task_family", "check_suite", "EvaluationRun", "run_suites", "write_results",
           "write_plots", "write_tensorboard", "report_lines"]

#: Suites a task file's family has (the others swap in built-in datasets, activations or widths).
TASK_FILE_SUITES = ("heldout", "horizon")
#: What ``evaluate --suite`` accepts: a suite, or ``all`` (every suite but ``long``).
SUITE_CHOICES = (*ev.SUITES, "all")


def task_family(family: str | None, task_file: Path | None, rule: str) -> str:
    """The family ``evaluate``/``analyze`` build tasks from: ``family``, else ``task_file``'s, else that of
    the task file a run directory ``rule`` recorded (checked against its fingerprint), else digits-mlp.
    Raises ``ValueError`` (one line) when they disagree or a task file cannot be used."""
    from ..metatrain.config import MetaConfig
    from ..tasks.taskfile import load_task_file

    try:
        if task_file is not None:
            loaded = load_task_file(task_file).family.name
            if family is not None and family != loaded:
                raise ValueError(f"--family {family} and --task {task_file} (family {loaded!r}) disagree; give one")
            return loaded
        config = Path(rule) / "config.json"
        if family is None and config.is_file():
            try:
                saved = json.loads(config.read_text())
            except (OSError, ValueError):
                saved = None
            if isinstance(saved, dict) and saved.get("task_file") is not None:
                try:
                    return MetaConfig.load_run(config).family
                except (ValueError, TypeError) as exc:
                    raise ValueError(f"{config}: {first_line(exc)}") from None
    except TaskFileError as exc:
        raise ValueError(str(exc)) from None
    return family or "digits-mlp"


def check_suite(family: str, suite: str) -> None:
    """Raise ``ValueError`` (one line) for an unknown family, or a suite a task file's family does not have."""
    fam = ev.get_family(family)
    if fam.source and suite not in TASK_FILE_SUITES:
        raise ValueError(f"--suite {suite} changes built-in tasks; a task file's family {family!r} has the suites "
                         f"{' and '.join(TASK_FILE_SUITES)}")


@dataclass
class EvaluationRun:
    """What :func:`run_suites` produced (``interrupted``: stopped by Ctrl-C after the tasks in it)."""

    rule_path: Path
    steps: int
    seeds: int
    family: str
    methods: dict[str, tuple[str, ...]]
    reports: dict[str, Any] = field(default_factory=dict)
    results: dict[str, list[Any]] = field(default_factory=dict)
    interrupted: bool = False

    def document(self) -> dict[str, Any]:
        """The JSON report (a single suite's keys also at the top level)."""
        doc = {"rule": str(self.rule_path), "steps": self.steps, "seeds": self.seeds, "family": self.family,
               "suites": self.reports}
        if len(self.reports) == 1:
            doc.update(next(iter(self.reports.values())))
        return doc


def run_suites(rule: tuple[BackwardRule, UpdateRule], rule_path: Path, family: str, suite: str, steps: int,
               seeds: int, n_tasks: int, tuning_seeds: int, out: Path | None, progress: bool,
               device: str = "cpu") -> EvaluationRun:
    """Evaluate ``rule`` on ``suite`` (or ``all``) of ``family`` (checked first with :func:`check_suite`).
    Tuned learning rates are cached under ``out/tuning`` (else the user cache), per version of a task
    file; results are written to ``out`` as each task finishes."""
    from tqdm import tqdm

    fam = ev.get_family(family)
    suites = [s for s in ev.SUITES if s != "long"] if suite == "all" else [suite]
    cache = (out / "tuning") if out else Path.home() / ".cache" / "mpbackprop" / "tuning"
    if fam.source:  # tuned learning rates belong to one version of the task file
        cache = cache / f"{family}-{fam.sha256[:16]}"
    plan = {s: ev.suite_tasks(s, family, n_tasks, steps) for s in suites}
    run = EvaluationRun(rule_path, steps, seeds, family, {s: ev.SUITE_METHODS.get(s, ev.METHODS) for s in suites})
    total = sum(len(v) * len(run.methods[s]) for s, v in plan.items())
    bar = tqdm(total=total, disable=not progress, desc="evaluate", unit="run", dynamic_ncols=True, file=sys.stderr)

    def tick(message: str) -> None:
        if message.startswith("ran"):
            bar.update(1)
        bar.set_postfix_str(message[:60])

    try:
        for s, tasks in plan.items():
            results: list[Any] = []
            for task in tasks:
                results += ev.evaluate([task], rule, seeds=seeds, methods=run.methods[s], tuning_seeds=tuning_seeds,
                                       cache=cache, progress=tick, device=device)
                run.results[s] = results
                run.reports[s] = ev.summarize(results, run.methods[s])
                if out:
                    write_results(out, run)
    except KeyboardInterrupt:
        run.interrupted = True
    finally:
        bar.close()
    return run


def report_lines(run: EvaluationRun, titles: bool = False) -> list[str]:
    """The text report: per suite a title line and :func:`~mpbackprop.evaluation.format_report`'s table
    (``titles``: the long title the command prints, else ``== suite <name>`` as in ``report.txt``)."""
    lines = []
    for s, rep in run.reports.items():
        lines.append(f"== suite {s} (rule {run.rule_path}, T={run.steps}, {run.seeds} seeds)" if titles
                     else f"== suite {s}")
        lines += ev.format_report(rep, tuple(rep["methods"]))
    return lines


def write_results(out: Path, run: EvaluationRun) -> None:
    """``results.json`` (rule, steps, seeds, suites) and ``report.txt`` in ``out``."""
    doc = {"rule": str(run.rule_path), "steps": run.steps, "seeds": run.seeds, "suites": run.reports}
    atomic_write(out / "results.json", lambda p: Path(p).write_text(dumps(doc, indent=2)))
    atomic_write(out / "report.txt", lambda p: Path(p).write_text("\n".join(report_lines(run)) + "\n"))


def write_plots(run: EvaluationRun, plot: Path | None, out: Path | None) -> None:
    """Learning curves: to ``plot`` (one file per suite, ``<stem>-<suite>``, when there are several) and
    to ``out/curves-<suite>.png``."""
    for s, results in run.results.items():
        target = plot if (plot and len(run.results) == 1) else None
        if target is None and plot:
            target = plot.with_name(f"{plot.stem}-{s}{plot.suffix}")
        if target is not None:
            ev.plot_curves(results, target, run.methods[s])
        if out:
            ev.plot_curves(results, out / f"curves-{s}.png", run.methods[s])


def write_tensorboard(run: EvaluationRun, tb_dir: Path) -> None:
    """The learning curves as TensorBoard scalars in ``tb_dir``."""
    from .tensorboard import TensorBoard

    tb = TensorBoard(tb_dir)
    for s, results in run.results.items():
        tb.evaluation(s, results)
    tb.close()
