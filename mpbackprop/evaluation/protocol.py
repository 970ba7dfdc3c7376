"""Evaluation protocol (method.md §5): a learned rule against tuned baselines, on fresh seeds.

Methods (same budget, same batches per seed):

=============================  ==================================  ========================
name                           backward                            update
=============================  ==================================  ========================
``learned``                    learned                             learned
``backprop_learned_update``    exact backprop                      learned
``learned_backward_adam``      learned                             Adam (tuned)
``fa_adam``                    feedback alignment                  Adam (tuned)
``sgd`` / ``momentum``         exact backprop                      SGD / SGD+0.9 (tuned)
``adam``                       exact backprop                      Adam (tuned)
=============================  ==================================  ========================

Each hand-designed update's learning rate is tuned per task on *tuning seeds* disjoint
from the reported seeds, for the same horizon, over a log grid of quarter decades that
grows while the best value sits at its edge; results are cached on disk. Reported per
method and task: validation loss/accuracy at ``T`` (mean and 95% t-interval), the paired
difference to tuned Adam, the speedup ``T / steps-to-reach tuned Adam's loss at T``,
milliseconds per step (a fused kernel's one-off compilation excluded: it is logged by
:func:`~mpbackprop.rules.kernels.compile_log`), and the wall-clock speedup: Adam's time for ``T``
steps over the method's time to reach that loss (``T·ms_adam / (steps-to-reach·ms_method)``, the
step speedup times the ratio of step times — a method slower per step must be faster in steps to win).

A run whose validation loss stops being finite (or exceeds :data:`DIVERGED_LOSS`) is *diverged*: its remaining
losses are ``inf``. Statistics over such runs are not finite; the JSON reports write them as
``null`` (:mod:`mpbackprop._json`) and count the runs in ``"diverged"``. Nothing here prints
numpy warnings for them. The ``long`` suite's criterion is stricter: a run *failed* when its final
loss is not finite or above the loss it started from (``"failed"``, :attr:`RunCurve.failed`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from .. import _json as strict_json
from .._io import atomic_write
from ..engine.inner_step import InnerStep
from ..metatrain.inner import get_task
from ..rules import SGD, Adam, BackwardRule, Exact, FeedbackAlignment, UpdateRule, kernels
from ..tasks.registry import FAMILIES, TaskSpec, get_family
from ..device import place, synchronize
from ..device import resolve as resolve_device

__all__ = ["METHODS", "SUITES", "RunCurve", "run_method", "tune_lr", "evaluate", "suite_tasks", "ci95", "curve_band", "is_diverged",
           "plot_curves", "picture_format", "TUNING_SEED_BASE", "REPORT_SEED_BASE", "DIVERGED_SCORE", "log_score",
           "steps_to_reach", "speedup", "geomean"]

METHODS = ("learned", "backprop_learned_update", "learned_backward_adam", "fa_adam", "sgd", "momentum", "adam")
#: tuned methods → (update kind, initial grid exponents of 10 in quarter decades)
_TUNED = {"sgd": ("sgd", (-3.0, 1.0)), "momentum": ("momentum", (-4.0, 0.0)), "adam": ("adam", (-4.0, 0.0)),
          "fa_adam": ("adam", (-4.0, 0.0)), "learned_backward_adam": ("adam", (-4.0, 0.0))}
SUITES = ("heldout", "wider", "deeper", "act", "data", "horizon", "conv", "long")
#: The ``long`` suite: held-out tasks of these families (and 4x wider, 2x deeper nets of the evaluated
#: family), trained for these multiples of T, every baseline re-tuned for each horizon.
LONG_FAMILIES = ("digits-mlp", "tabular-mlp", "synthetic", "digits-conv")
LONG_MULTIPLES = (10, 25)
#: Methods per suite (default: :data:`METHODS`); the long suite runs the rule against the tuned baselines.
SUITE_METHODS: dict[str, tuple[str, ...]] = {"long": ("learned", "sgd", "momentum", "adam")}
#: Seed ``TUNING_SEED_BASE + s`` is tuning seed ``s`` (learning rates are chosen on these), and
#: ``REPORT_SEED_BASE + s`` report seed ``s`` (reported numbers come from these): the two never meet.
TUNING_SEED_BASE = 5_000_000
REPORT_SEED_BASE = 7_000_000
#: The score of a final loss that is not finite or not positive (a diverged run), in :func:`log_score`.
DIVERGED_SCORE = 50.0
#: A validation loss above this (or not finite) means the run diverged.
DIVERGED_LOSS = 1e6


def log_score(loss: float) -> float:
    """The tuning score of a run's final validation loss: ``log(loss)``, or :data:`DIVERGED_SCORE` (50) when the
    loss is not finite or not positive. :func:`tune_lr` chooses the rate of least mean score over tuning seeds."""
    return math.log(loss) if math.isfinite(loss) and loss > 0 else DIVERGED_SCORE


def is_diverged(loss: float) -> bool:
    """Whether a validation loss marks a diverged run (not finite, or above :data:`DIVERGED_LOSS`)."""
    return not math.isfinite(loss) or loss > DIVERGED_LOSS


@dataclass
class RunCurve:
    """Validation loss (and accuracy) after every step ``1..T`` of one run, plus timing."""

    loss: list[float]
    acc: list[float]
    ms_per_step: float
    diverged: bool = False
    initial: float = math.nan  # validation loss before the first step

    @property
    def failed(self) -> bool:
        """Failed (the long suite's criterion): the final loss is not finite, or above the loss the run
        started from — a run that blew up late counts even if it never left :data:`DIVERGED_LOSS`."""
        final = self.loss[-1] if self.loss else math.nan
        return self.diverged or not math.isfinite(final) or (math.isfinite(self.initial) and final > self.initial)


def _update(kind: str, lr: float) -> UpdateRule:
    if kind == "sgd":
        return SGD(lr)
    if kind == "momentum":
        return SGD(lr, momentum=0.9)
    return Adam(lr)


def _method_rules(method: str, rule: tuple[BackwardRule, UpdateRule] | None, lr: float | None,
                  seed: int) -> tuple[BackwardRule, UpdateRule]:
    learned_b, learned_u = rule if rule is not None else (None, None)
    if method in ("learned", "backprop_learned_update", "learned_backward_adam") and rule is None:
        raise ValueError(f"method {method!r} needs a learned rule")
    if method == "learned":
        return learned_b, learned_u  # type: ignore[return-value]
    if method == "backprop_learned_update":
        return Exact(), learned_u  # type: ignore[return-value]
    kind = _TUNED[method][0]
    assert lr is not None
    backward: BackwardRule
    if method == "learned_backward_adam":
        backward = learned_b  # type: ignore[assignment]
    elif method == "fa_adam":
        backward = FeedbackAlignment(seed=seed)
    else:
        backward = Exact()
    return backward, _update(kind, lr)


def run_method(spec: TaskSpec, method: str, steps: int, seed: int, rule: tuple[BackwardRule, UpdateRule] | None = None,
               lr: float | None = None, val_examples: int | None = None,
               device: str | torch.device = "cpu") -> RunCurve:
    """Train ``spec`` (initialisation and batch order from ``seed``) for ``steps`` steps with ``method``
    on ``device`` (:mod:`mpbackprop.device`; the data are drawn on the CPU and moved there)."""
    dev = resolve_device(device)
    run_spec = replace(spec, init_seed=spec.init_seed + seed)
    task = get_task(run_spec)
    backward, update = _method_rules(method, rule, lr, seed)
    theta, backward, update = place(task.net, task.theta0.clone(), backward, update, dev)
    gen = task.batch_generator(seed)  # same batches for every method of this seed
    run = InnerStep.start(task.net, theta, backward, update, total_steps=steps,
                          batches=lambda: task.batch(gen), loss=task.loss)
    losses, accs = [], []
    elapsed = 0.0
    diverged = False
    compiles = len(kernels.compile_log())  # a fused kernel's one-off compilation is not a step's time
    with torch.no_grad():
        initial = float(task.evaluate(run.theta, val_examples)[0])
        for k in range(steps):
            x, y = run.next_batch()
            t0 = time.perf_counter()
            run.step(x, y)
            synchronize(dev)
            elapsed += time.perf_counter() - t0
            loss, acc = task.evaluate(run.theta, val_examples)
            lv = float(loss)
            if is_diverged(lv):
                diverged = True
                losses += [math.inf] * (steps - k)
                accs += [float("nan")] * (steps - k)
                break
            losses.append(lv)
            accs.append(float(acc))
    elapsed -= sum(float(e["seconds"]) for e in kernels.compile_log()[compiles:])  # type: ignore[arg-type]
    return RunCurve(losses, accs, 1000 * max(elapsed, 0.0) / max(len([x for x in losses if math.isfinite(x)]), 1),
                    diverged, initial)


def _cache_key(spec: TaskSpec, method: str, steps: int, seeds: list[int]) -> str:
    blob = json.dumps({"spec": spec.to_json(), "method": method, "steps": steps, "seeds": seeds}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def tune_lr(spec: TaskSpec, method: str, steps: int, tuning_seeds: int = 2,
            rule: tuple[BackwardRule, UpdateRule] | None = None, cache: Path | None = None,
            val_examples: int | None = None, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Best learning rate of a tuned method by mean log validation loss at ``steps`` on tuning seeds.

    Grid: half decades ``10^(k/2)`` over the method's range, extended (up to 8 times) while the
    best is at an edge, then the quarter-decade neighbours of the best (a quarter-decade
    optimum for a unimodal response at ~2/3 of the cost of the full quarter-decade grid).
    With a learned backward (``learned_backward_adam``) the cache key does not know the rule,
    so pass ``cache=None`` there unless the cache directory belongs to one rule.
    """
    seeds = [TUNING_SEED_BASE + s for s in range(tuning_seeds)]
    key = _cache_key(spec, method, steps, seeds)
    path = cache / f"{key}.json" if cache is not None else None
    cached = _read_cached(path) if path is not None else None
    if cached is not None:
        return cached
    lo, hi = _TUNED[method][1]
    scores: dict[float, float] = {}

    def score(exp: float) -> float:
        if exp not in scores:
            lr = 10.0**exp
            vals = []
            for s in seeds:
                curve = run_method(spec, method, steps, s, rule, lr, val_examples, device=device)
                vals.append(log_score(curve.loss[-1]))
            scores[exp] = sum(vals) / len(vals)
        return scores[exp]

    # coarse-to-fine: half decades over the range, grown while the best sits at an edge,
    # then the quarter-decade neighbours of the best
    for k in range(int(round((hi - lo) / 0.5)) + 1):
        score(lo + 0.5 * k)
    for _ in range(8):
        best = min(scores, key=scores.get)  # type: ignore[arg-type]
        if best == min(scores):
            score(best - 0.5)
        elif best == max(scores):
            score(best + 0.5)
        else:
            break
    best = min(scores, key=scores.get)  # type: ignore[arg-type]
    score(best - 0.25)
    score(best + 0.25)
    best = min(scores, key=scores.get)  # type: ignore[arg-type]
    result = {"method": method, "lr": 10.0**best, "grid": {f"{10.0**e:.3g}": v for e, v in sorted(scores.items())},
              "steps": steps, "tuning_seeds": seeds}
    if path is not None:
        atomic_write(path, lambda p: Path(p).write_text(strict_json.dumps(result, indent=1)))
    return result


def _read_cached(path: Path) -> dict[str, Any] | None:
    """A tuning result from the cache, or None (no file, or one that is unreadable or has no usable
    learning rate: it is tuned again and overwritten). Grid scores may be ``null`` (not finite)."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, unreadable, not JSON
        return None
    lr = doc.get("lr") if isinstance(doc, dict) else None
    if not isinstance(lr, (int, float)) or isinstance(lr, bool) or not math.isfinite(lr) or lr <= 0:
        return None
    return doc


def ci95(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t-interval; with a value that is not finite, the mean is not either and the
    interval is ``nan`` (computed without numpy warnings)."""
    import numpy as np
    from scipy import stats

    arr = np.asarray(values, dtype=float)
    if len(arr) < 2 or not np.isfinite(arr).all():
        mean = sum(float(v) for v in arr) / len(arr) if len(arr) else float("nan")  # inf + -inf: nan, silently
        return mean, float("nan"), float("nan")
    mean = float(arr.mean())
    half = float(stats.t.ppf(0.975, len(arr) - 1) * arr.std(ddof=1) / math.sqrt(len(arr)))
    return mean, mean - half, mean + half


def combine_task_cis(entries: list[tuple[float, float, float]], n: int) -> tuple[float, float, float]:
    """Mean over tasks of per-task means, with a 95% interval from the per-task standard errors
    (each task's interval came from ``n`` seeds; tasks are independent)."""
    from scipy import stats

    k = len(entries)
    mean = sum(e[0] for e in entries) / k
    if n < 2 or any(not math.isfinite(e[1]) for e in entries):
        return mean, float("nan"), float("nan")
    t = float(stats.t.ppf(0.975, n - 1))
    se = math.sqrt(sum(((e[2] - e[1]) / (2 * t)) ** 2 for e in entries)) / k
    return mean, mean - t * se, mean + t * se


def steps_to_reach(curve: list[float], target: float) -> int | None:
    """The first step (1-based) at which ``curve`` is at or below ``target``; None when it never is."""
    for k, v in enumerate(curve):
        if v <= target:
            return k + 1
    return None


def speedup(curves: list[RunCurve], target: float, steps: int) -> tuple[int | None, float]:
    """Steps for the mean over ``curves`` (per step) to reach ``target`` (tuned Adam's mean final loss),
    and the speedup ``steps / that`` (0 when the mean curve never reaches it within ``steps``)."""
    mean_curve = [sum(c.loss[k] for c in curves) / len(curves) for k in range(steps)]
    reach = steps_to_reach(mean_curve, target)
    return reach, steps / reach if reach else 0.0


def suite_tasks(suite: str, family: str, n_tasks: int, steps: int, seed: int = 0,
                split: str = "heldout") -> list[tuple[TaskSpec, int]]:
    """``(task, horizon)`` pairs of an evaluation suite built from ``family``'s held-out tasks
    (``split="valid"``: the same suite on meta-validation tasks, for choosing a recipe without
    looking at held-out ones)."""
    fam = get_family(family)
    base = fam.tasks(split, n_tasks, seed=seed)
    if suite == "heldout":
        return [(s, steps) for s in base]
    if suite == "wider":
        return [(replace(s, widths=tuple(w * f for w in s.widths)), steps) for s in base for f in (2, 4)]
    if suite == "deeper":
        return [(replace(s, widths=s.widths * 2), steps) for s in base]
    if suite == "act":
        unseen = [a for a in ("gelu", "silu", "elu", "leaky_relu", "softplus") if a not in fam.activations]
        return [(replace(s, activation=unseen[k % len(unseen)]), steps) for k, s in enumerate(base)]
    if suite == "data":
        others = [d for d in ("wine", "breast_cancer", "iris", "gauss", "moons") if d not in fam.datasets]
        return [(replace(s, dataset=others[k % len(others)]), steps) for k, s in enumerate(base)]
    if suite == "horizon":
        return [(s, steps * f) for s in base for f in (2, 5)]
    if suite == "conv":
        return [(s, steps) for s in FAMILIES["digits-conv"].tasks(split, n_tasks, seed=seed)]
    if suite == "long":
        specs = [s for name in LONG_FAMILIES for s in FAMILIES[name].tasks(split, n_tasks, seed=seed)]
        specs += [replace(s, widths=tuple(4 * w for w in s.widths)) for s in base]
        specs += [replace(s, widths=s.widths * 2) for s in base]
        return [(s, steps * k) for s in specs for k in LONG_MULTIPLES]
    raise ValueError(f"unknown suite {suite!r}; known: {', '.join(SUITES)}")


@dataclass
class TaskResult:
    spec: TaskSpec
    steps: int
    lrs: dict[str, float]
    curves: dict[str, list[RunCurve]] = field(default_factory=dict)


def evaluate(tasks: list[tuple[TaskSpec, int]], rule: tuple[BackwardRule, UpdateRule] | None, seeds: int = 10,
             methods: tuple[str, ...] = METHODS, tuning_seeds: int = 2, cache: Path | None = None,
             val_examples: int | None = None,
             progress: Callable[[str], None] | None = None, device: str | torch.device = "cpu") -> list[TaskResult]:
    """Run every method on every task for ``seeds`` fresh seeds (tuning first, cached), on ``device``
    (the tuning cache does not record it: a learning rate tuned on one device serves the others)."""
    results = []
    for spec, steps in tasks:
        lrs = {}
        for m in methods:
            if m in _TUNED:
                rule_cache = cache if m != "learned_backward_adam" else None
                lrs[m] = tune_lr(spec, m, steps, tuning_seeds, rule, rule_cache, val_examples, device)["lr"]
                if progress:
                    progress(f"tuned {m} on {spec.name}: lr {lrs[m]:.3g}")
        res = TaskResult(spec, steps, lrs)
        for m in methods:
            res.curves[m] = [run_method(spec, m, steps, REPORT_SEED_BASE + s, rule, lrs.get(m), val_examples, device)
                             for s in range(seeds)]
            if progress:
                progress(f"ran {m} on {spec.name}")
        results.append(res)
    return results


def summarize(results: list[TaskResult], methods: tuple[str, ...] = METHODS) -> dict[str, Any]:
    """The JSON report: per method (averaged over tasks) and per task."""
    per_method: dict[str, Any] = {}
    task_rows = []
    for res in results:
        row: dict[str, Any] = {"task": res.spec.name, "steps": res.steps, "lrs": res.lrs, "methods": {}}
        adam_final = [c.loss[-1] for c in res.curves.get("adam", [])]
        target = sum(adam_final) / len(adam_final) if adam_final else None
        adam_ms = (sum(c.ms_per_step for c in res.curves["adam"]) / len(res.curves["adam"])
                   if adam_final else math.nan)
        for m in methods:
            curves = res.curves[m]
            final = [c.loss[-1] for c in curves]
            acc = [c.acc[-1] for c in curves]
            mean, lo, hi = ci95(final)
            entry: dict[str, Any] = {"val_loss_mean": mean, "val_loss_ci": [lo, hi],
                                     "val_acc_mean": float(sum(acc) / len(acc)) if acc else float("nan"),
                                     "ms_per_step": sum(c.ms_per_step for c in curves) / len(curves),
                                     "diverged": sum(c.diverged for c in curves),
                                     "failed": sum(c.failed for c in curves), "runs": len(curves)}
            if target is not None:
                entry["ratio_to_adam"] = mean / target if target > 0 else float("nan")
                reach, entry["speedup_vs_adam"] = speedup(curves, target, res.steps)
                entry["steps_to_adam_loss"] = reach
                entry["wallclock_speedup_vs_adam"] = _wallclock(res.steps, reach, adam_ms, entry["ms_per_step"])
                diffs = [a - b for a, b in zip(final, adam_final)]
                dm, dlo, dhi = ci95(diffs)
                entry["paired_diff_vs_adam"] = {"mean": dm, "ci": [dlo, dhi]}
            row["methods"][m] = entry
        task_rows.append(row)
    seeds = len(results[0].curves[methods[0]]) if results else 0
    for m in methods:
        entries = [r["methods"][m] for r in task_rows]
        n = len(entries)
        mean, lo, hi = combine_task_cis([(e["val_loss_mean"], *e["val_loss_ci"]) for e in entries], seeds)
        per_method[m] = {
            "val_loss_mean": mean,
            "val_loss_ci": [lo, hi],
            "val_acc_mean": sum(e["val_acc_mean"] for e in entries) / n,
            "speedup_vs_adam": geomean([e.get("speedup_vs_adam", 0.0) for e in entries]),
            "wallclock_speedup_vs_adam": geomean([e.get("wallclock_speedup_vs_adam", 0.0) for e in entries]),
            "ms_per_step": sum(e["ms_per_step"] for e in entries) / n,
            "diverged": sum(e["diverged"] for e in entries),
            "failed": sum(e["failed"] for e in entries),
            "runs": sum(e["runs"] for e in entries),
        }
        if all("ratio_to_adam" in e for e in entries):
            ratios = [e["ratio_to_adam"] for e in entries]
            per_method[m]["ratio_to_adam_max"] = max(ratios)
            per_method[m]["ratio_to_adam_mean"] = sum(ratios) / n
        if all("paired_diff_vs_adam" in e for e in entries):
            dm, dlo, dhi = combine_task_cis([(e["paired_diff_vs_adam"]["mean"], *e["paired_diff_vs_adam"]["ci"])
                                             for e in entries], seeds)
            per_method[m]["paired_diff_vs_adam"] = {"mean": dm, "ci": [dlo, dhi]}
    return {"tasks": task_rows, "methods": per_method}


def _wallclock(steps: int, reach: int | None, adam_ms: float, ms: float) -> float:
    """Adam's time for ``steps`` steps over the method's time for ``reach`` steps (0 when never reached,
    ``nan`` when a step time is unknown)."""
    if not reach:
        return 0.0
    if not (adam_ms > 0 and ms > 0):
        return math.nan
    return steps * adam_ms / (reach * ms)


def geomean(values: list[float]) -> float:
    """Geometric mean of speedups: 0 when one is 0 (or negative: a task never reached the target), ``nan`` for
    no values."""
    if not values or any(v <= 0 for v in values):
        return 0.0 if any(v <= 0 for v in values) else float("nan")
    return math.exp(sum(math.log(v) for v in values) / len(values))


def curve_band(curves: list[list[float]]) -> tuple[Any, Any]:
    """Per step, the mean over runs and the half-width of its 95% t-interval, over the runs whose
    loss is finite at that step (``nan`` where none is, half-width ``nan`` where fewer than two
    are). Masked explicitly, so diverged runs raise no numpy warnings."""
    import numpy as np
    from scipy import stats

    arr = np.asarray(curves, dtype=float).reshape(len(curves), -1)
    ok = np.isfinite(arr)
    n = ok.sum(0)
    values = np.where(ok, arr, 0.0)
    mean = np.divide(values.sum(0), n, out=np.full(arr.shape[1], np.nan), where=n > 0)
    dev = np.where(ok, values - np.where(n > 0, mean, 0.0), 0.0)
    var = np.divide((dev**2).sum(0), n - 1, out=np.full(arr.shape[1], np.nan), where=n > 1)
    half = np.full(arr.shape[1], np.nan)
    several = n > 1
    half[several] = stats.t.ppf(0.975, n[several] - 1) * np.sqrt(var[several] / n[several])
    return mean, half


def picture_format(path: Path) -> str:
    """The matplotlib format a picture ``path`` asks for by its suffix (``png`` without one)."""
    return Path(path).suffix.lower().lstrip(".") or "png"


def plot_curves(results: list[TaskResult], path: Path, methods: tuple[str, ...] = METHODS) -> Path:
    """Learning curves (mean, 95% band over seeds) per method, one panel per task; the format
    (png, pdf, svg) follows the suffix of ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    n = len(results)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, res in zip(axes.flat, results):
        for k, m in enumerate(methods):
            mean, half = curve_band([c.loss for c in res.curves[m]])
            x = np.arange(1, len(mean) + 1)
            ax.plot(x, mean, color=f"C{k}", label=m, lw=1.6 if m in ("learned", "adam") else 1.0)
            if np.isfinite(half).any():
                ax.fill_between(x, mean - half, mean + half, color=f"C{k}", alpha=0.15)
        ax.set_yscale("log")
        ax.set_title(res.spec.name, fontsize=8)
        ax.set_xlabel("step")
        ax.set_ylabel("validation loss")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format=picture_format(path), dpi=90))
    plt.close(fig)
    return path



def resolve_rule(name: str | Path) -> tuple[BackwardRule, UpdateRule, Path]:
    """A rule from a meta-training directory (its ``best.pt``), a ``.pt`` file, or ``default``."""
    from ..rules import load_rule, rule_path

    path = rule_path(name)
    backward, update, _ = load_rule(path)
    return backward, update, path


def format_report(summary: dict[str, Any], methods: tuple[str, ...] = METHODS) -> list[str]:
    """Text table of a :func:`summarize` report: one block per task, then the average."""
    lines = []

    def block(title: str, entries: dict[str, Any]) -> None:
        lines.append(title)
        head = (f"  {'method':<24}{'val loss [95% CI]':>28}{'acc':>7}{'vs adam [95% CI]':>28}{'speedup':>9}"
                f"{'wall':>7}{'ms/step':>9}")
        lines.append(head)
        for m in methods:
            if m not in entries:
                continue
            e = entries[m]
            lo, hi = e["val_loss_ci"]
            diff = e.get("paired_diff_vs_adam")
            dtxt = f"{diff['mean']:+.4f} [{diff['ci'][0]:+.4f},{diff['ci'][1]:+.4f}]" if diff else ""
            acc = e["val_acc_mean"]
            loss = f"{e['val_loss_mean']:.4f} [{lo:.4f},{hi:.4f}]"
            if e.get("diverged"):  # the mean and interval are not finite: say why
                loss, dtxt = f"{e['diverged']} run(s) diverged", "n/a" if diff else ""
            speed = e.get("speedup_vs_adam", float("nan"))
            stxt = "<1" if speed == 0.0 else f"{speed:.2f}"  # 0: never reached Adam's loss within T
            wall = e.get("wallclock_speedup_vs_adam", float("nan"))
            wtxt = "<1" if wall == 0.0 else f"{wall:.2f}"
            lines.append(f"  {m:<24}{loss:>28}{acc:>7.3f}{dtxt:>28}{stxt:>9}{wtxt:>7}{e['ms_per_step']:>9.2f}")

    for row in summary["tasks"]:
        block(f"{row['task']}  (T={row['steps']})", row["methods"])
    block("mean over tasks (speedup: geometric mean)", summary["methods"])
    return lines
