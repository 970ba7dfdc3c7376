"""Evaluation protocol: learning-rate tuning, statistics, speedup, suites."""

from __future__ import annotations

import math
import warnings

import pytest

from mpbackprop import evaluation as ev
from mpbackprop._json import dumps, loads_strict
from mpbackprop.tasks import TaskSpec


def _fake_run(best_exp: float, calls: list):
    def run(spec, method, steps, seed, rule=None, lr=None, val_examples=None, device="cpu"):
        calls.append(lr)
        loss = 0.1 + (math.log10(lr) - best_exp) ** 2  # unimodal in log lr
        return ev.RunCurve([loss] * steps, [0.5] * steps, 1.0)
    return run


@pytest.mark.parametrize("best_exp", [-2.25, -5.25, 1.75])
def test_tuning_finds_the_quarter_decade_optimum_and_extends_the_grid(monkeypatch, tmp_path, best_exp):
    calls: list = []
    monkeypatch.setattr(ev.protocol, "run_method", _fake_run(best_exp, calls))
    spec = TaskSpec()
    res = ev.tune_lr(spec, "adam", 10, tuning_seeds=1, cache=tmp_path)
    assert res["lr"] == pytest.approx(10**best_exp)
    n = len(calls)
    again = ev.tune_lr(spec, "adam", 10, tuning_seeds=1, cache=tmp_path)  # cached: no new runs
    assert again == res and len(calls) == n


def test_ci95_matches_scipy():
    from scipy import stats

    values = [0.3, 0.5, 0.4, 0.45, 0.35]
    mean, lo, hi = ev.ci95(values)
    ref = stats.t.interval(0.95, len(values) - 1, loc=sum(values) / 5, scale=stats.sem(values))
    assert mean == pytest.approx(0.4) and lo == pytest.approx(ref[0]) and hi == pytest.approx(ref[1])


def test_summary_speedup_and_paired_differences():
    steps = 10
    adam = [ev.RunCurve([1.0 - 0.05 * k for k in range(steps)], [0.5] * steps, 2.0) for _ in range(3)]
    fast = [ev.RunCurve([1.0 - 0.1 * k for k in range(steps)], [0.6] * steps, 3.0) for _ in range(3)]
    slow = [ev.RunCurve([1.0] * steps, [0.1] * steps, 1.0) for _ in range(3)]
    res = ev.TaskResult(TaskSpec(), steps, {}, {"adam": adam, "learned": fast, "sgd": slow})
    doc = ev.summarize([res], methods=("learned", "sgd", "adam"))
    m = doc["tasks"][0]["methods"]
    assert m["adam"]["speedup_vs_adam"] == 1.0
    # Adam reaches 0.55 at step 10; the fast curve reaches it at step 6 (1 - 0.1*5 = 0.5 <= 0.55)
    assert m["learned"]["steps_to_adam_loss"] == 6 and m["learned"]["speedup_vs_adam"] == pytest.approx(10 / 6)
    assert m["sgd"]["speedup_vs_adam"] == 0.0  # never reached
    # wall clock: Adam takes 10 steps x 2 ms; the fast curve 6 steps x 3 ms
    assert m["adam"]["wallclock_speedup_vs_adam"] == 1.0
    assert m["learned"]["wallclock_speedup_vs_adam"] == pytest.approx(20 / 18)
    assert m["sgd"]["wallclock_speedup_vs_adam"] == 0.0
    assert doc["methods"]["learned"]["wallclock_speedup_vs_adam"] == pytest.approx(20 / 18)
    assert m["learned"]["paired_diff_vs_adam"]["mean"] == pytest.approx(0.1 - 0.55)
    assert doc["methods"]["learned"]["val_acc_mean"] == pytest.approx(0.6)
    lines = ev.format_report(doc, methods=("learned", "sgd", "adam"))
    assert any("<1" in line for line in lines)
    assert "wall" in lines[1] and any(" 1.11 " in line for line in lines if line.lstrip().startswith("learned"))


@pytest.mark.parametrize("suite", ev.SUITES)
def test_suites_build_distinct_transfer_tasks(suite):
    base = ev.suite_tasks("heldout", "digits-mlp", 2, 50)
    tasks = ev.suite_tasks(suite, "digits-mlp", 2, 50)
    assert tasks
    if suite == "wider":
        assert all(t.widths[0] > b.widths[0] for (t, _), (b, _) in zip(tasks[::2], base))
    if suite == "deeper":
        assert all(len(t.widths) == 2 * len(b.widths) for (t, _), (b, _) in zip(tasks, base))
    if suite == "act":
        assert all(t.activation not in ("relu", "tanh") for t, _ in tasks)
    if suite == "data":
        assert all(t.dataset != "digits" for t, _ in tasks)
    if suite == "horizon":
        assert sorted({h for _, h in tasks}) == [100, 250]
    if suite == "conv":
        assert all(t.arch == "conv" for t, _ in tasks)


def test_combined_task_intervals():
    from scipy import stats

    t = stats.t.ppf(0.975, 9)
    # two tasks with standard errors 0.1 and 0.2: the mean of means has se sqrt(0.01 + 0.04) / 2
    mean, lo, hi = ev.combine_task_cis([(1.0, 1.0 - t * 0.1, 1.0 + t * 0.1), (3.0, 3.0 - t * 0.2, 3.0 + t * 0.2)], 10)
    assert mean == pytest.approx(2.0)
    assert hi - mean == pytest.approx(t * math.sqrt(0.05) / 2)
    assert lo == pytest.approx(2 * mean - hi)


def test_curve_band_uses_the_finite_runs_of_each_step():
    from scipy import stats

    inf = math.inf
    mean, half = ev.curve_band([[1.0, 2.0, inf], [3.0, inf, inf], [2.0, 5.0, inf]])
    assert mean[0] == pytest.approx(2.0) and half[0] == pytest.approx(stats.t.ppf(0.975, 2) * stats.sem([1, 3, 2]))
    assert mean[1] == pytest.approx(3.5) and half[1] == pytest.approx(stats.t.ppf(0.975, 1) * stats.sem([2, 5]))
    assert math.isnan(mean[2]) and math.isnan(half[2])  # every run diverged by then
    mean, half = ev.curve_band([[1.0], [inf]])
    assert mean[0] == 1.0 and math.isnan(half[0])  # one finite run: no interval


def test_statistics_and_plots_of_diverged_runs_raise_no_warnings(tmp_path):
    steps, inf, nan = 5, math.inf, math.nan
    adam = [ev.RunCurve([1.0 - 0.1 * k - 0.01 * s for k in range(steps)], [0.5] * steps, 1.0) for s in range(3)]
    partly = [ev.RunCurve([1.0, 0.9] + [inf] * 3, [0.5, 0.5] + [nan] * 3, 1.0, True)] + adam[:2]
    blown = [ev.RunCurve([inf] * steps, [nan] * steps, 1.0, True) for _ in range(3)]
    res = ev.TaskResult(TaskSpec(), steps, {}, {"adam": adam, "learned": partly, "sgd": blown})
    methods = ("learned", "sgd", "adam")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # numpy's "Mean of empty slice", "invalid value encountered", ...
        doc = ev.summarize([res], methods=methods)
        lines = ev.format_report(doc, methods=methods)
        ev.plot_curves([res], tmp_path / "curves.svg", methods=methods)
        mean, lo, hi = ev.ci95([inf, -inf, 1.0])
    assert math.isnan(mean) and math.isnan(lo) and math.isnan(hi)
    assert doc["methods"]["sgd"]["diverged"] == 3 and doc["methods"]["learned"]["diverged"] == 1
    assert any(line.split()[:4] == ["sgd", "3", "run(s)", "diverged"] for line in lines), lines
    assert (tmp_path / "curves.svg").read_text().lstrip().startswith("<?xml")
    strict = loads_strict(dumps(doc))
    assert strict["methods"]["sgd"]["val_loss_mean"] is None and strict["methods"]["learned"]["val_loss_ci"] == [None, None]
    assert strict["methods"]["adam"]["val_loss_mean"] == pytest.approx(doc["methods"]["adam"]["val_loss_mean"])


def test_long_suite_covers_every_family_wider_and_deeper_at_10t_and_25t():
    pairs = ev.suite_tasks("long", "digits-mlp", 1, 100)
    horizons = {steps for _, steps in pairs}
    assert horizons == {1000, 2500}
    datasets = {spec.dataset for spec, _ in pairs}
    assert {"digits", "digits-image"} <= datasets and len(datasets) >= 4  # tabular and synthetic families too
    base = ev.get_family("digits-mlp").tasks("heldout", 1)[0]
    widths = {spec.widths for spec, _ in pairs if spec.dataset == "digits" and spec.arch == "mlp"}
    assert widths == {base.widths, tuple(4 * w for w in base.widths), base.widths * 2}
    assert len(pairs) == 2 * (len(ev.LONG_FAMILIES) + 2)
    heldout_seeds = {s.init_seed for name in ev.LONG_FAMILIES for s in ev.get_family(name).tasks("heldout", 1)}
    assert {spec.init_seed for spec, _ in pairs} <= heldout_seeds


@pytest.mark.parametrize("loss, initial, failed", [
    ([2.0, 1.0, 0.5], 2.3, False), ([2.0, 1.0, 2.5], 2.3, True), ([2.0, math.inf], 2.3, True),
    ([2.0, 1.0], math.nan, False),
])
def test_a_run_failed_when_its_final_loss_is_not_finite_or_above_its_start(loss, initial, failed):
    assert ev.RunCurve(loss, [0.5] * len(loss), 1.0, initial=initial).failed is failed


def test_summary_counts_failed_runs_and_the_ratio_to_adam():
    spec = TaskSpec()
    curves = {"learned": [ev.RunCurve([1.0, 0.2], [0.9] * 2, 1.0, initial=2.0),
                          ev.RunCurve([1.0, 3.0], [0.1] * 2, 1.0, initial=2.0)],
              "adam": [ev.RunCurve([1.0, 0.5], [0.9] * 2, 1.0, initial=2.0)] * 2}
    rep = ev.summarize([ev.TaskResult(spec, 2, {}, curves)], ("learned", "adam"))
    learned = rep["methods"]["learned"]
    assert learned["failed"] == 1 and learned["diverged"] == 0 and learned["runs"] == 2
    assert learned["ratio_to_adam_max"] == pytest.approx(1.6 / 0.5)
    loads_strict(dumps(rep))


def test_step_time_leaves_out_a_fused_kernels_compilation(monkeypatch):
    from mpbackprop.rules import kernels

    spec = TaskSpec()
    plain = ev.run_method(spec, "adam", 3, 0, lr=1e-3)
    log: list[dict] = []

    def compile_log():  # a compilation of 1000 s is logged during the run
        out = list(log)
        log.append({"kernel": "scheduled", "params": 1, "seconds": 1000.0})
        return out

    monkeypatch.setattr(kernels, "compile_log", compile_log)
    timed = ev.run_method(spec, "adam", 3, 0, lr=1e-3)
    assert plain.ms_per_step > 0 and timed.ms_per_step == 0.0  # 1000 s taken off (clamped at 0)
    assert timed.loss == plain.loss
