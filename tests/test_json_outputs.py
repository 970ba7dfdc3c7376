"""Every JSON document the CLI prints or writes is strict JSON (no ``NaN`` / ``Infinity``, which
jq and JavaScript reject), also when a method diverges and non-finite numbers really occur."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
import warnings
from pathlib import Path

import pytest
from click.testing import CliRunner

from mpbackprop import evaluation as ev
from mpbackprop._json import loads_strict
from mpbackprop.cli import main
from mpbackprop.rules import LearnedBackward, LearnedUpdate, save_rule
from mpbackprop.tasks import TaskSpec

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
#: The smallest evaluation (see tests/test_cli_train.py): one task, 3 steps, 2 seeds, 1 tuning seed.
TINY_EVAL = ["--family", "tabular-mlp", "--steps", "3", "--seeds", "2", "--tasks", "1", "--tuning-seeds", "1",
             "--no-progress"]


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def run_without_warnings(*args: object):
    """``run``, with every warning an error: the command must not print one (it would exit 70)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return run(*args)


@pytest.fixture(scope="module")
def diverging_rule(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A learned rule whose update starts as Adam with learning rate 1e9: every run with it diverges."""
    path = tmp_path_factory.mktemp("rule") / "diverging.pt"
    save_rule(path, LearnedBackward(), LearnedUpdate(lr=1e9))
    return path


# ------------------------------------------------------------------- compile / inspect / verify
def test_compile_json_is_strict(tmp_path: Path) -> None:
    out = tmp_path / "net.json"
    res = run("compile", EXAMPLES / "convnet.py", "--format", "json", "-o", out)
    assert res.exit_code == 0, res.output
    doc = loads_strict(out.read_text())
    assert doc["format"] == "mpbackprop-json" and doc["nodes"]["param"]["count"] == 448


def test_inspect_json_is_strict(tmp_path: Path) -> None:
    assert run("compile", EXAMPLES / "resmlp.py", "-o", tmp_path / "net.bin").exit_code == 0
    res = run("inspect", tmp_path / "net.bin", "--json")
    assert res.exit_code == 0, res.output
    assert loads_strict(res.stdout)["layers"]


@pytest.mark.parametrize("rule", ["exact", "fa"])
def test_verify_json_is_strict(rule: str) -> None:
    res = run("verify", EXAMPLES / "mlp_relu.py", "--rule", rule, "--json")
    assert res.exit_code == 0, res.output
    doc = loads_strict(res.stdout)
    assert doc["ok"] is True and doc["layers"]


# ------------------------------------------------------------------------------ evaluate
def test_evaluate_json_results_and_cache_are_strict_when_methods_diverge(diverging_rule: Path,
                                                                          tmp_path: Path) -> None:
    out = tmp_path / "ev"
    res = run_without_warnings("evaluate", diverging_rule, *TINY_EVAL, "--json", "--out", out,
                               "--plot", tmp_path / "curves.pdf")
    assert res.exit_code == 0, res.output
    assert "Warning" not in res.stderr
    doc = loads_strict(res.stdout)
    learned, adam = doc["methods"]["learned"], doc["methods"]["adam"]
    # the learned rule diverged on both seeds: its statistics were inf / nan, now null and counted
    assert learned["diverged"] == 2
    assert learned["val_loss_mean"] is None and learned["val_loss_ci"] == [None, None]
    assert learned["paired_diff_vs_adam"]["mean"] is None
    assert adam["diverged"] == 0 and math.isfinite(adam["val_loss_mean"]) and None not in adam["val_loss_ci"]
    written = loads_strict((out / "results.json").read_text())
    assert written["suites"]["heldout"] == doc["suites"]["heldout"]
    cache = sorted((out / "tuning").glob("*.json"))
    assert len(cache) == 4  # sgd, momentum, adam, fa_adam (learned_backward_adam is never cached)
    for path in cache:
        assert loads_strict(path.read_text())["lr"] > 0
    assert (tmp_path / "curves.pdf").read_bytes().startswith(b"%PDF")  # the suffix picks the format
    assert (out / "curves-heldout.png").read_bytes().startswith(b"\x89PNG")


def test_tuning_cache_reads_null_back_and_retunes_a_broken_entry(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    calls: list[float] = []

    def run_method(spec, method, steps, seed, rule=None, lr=None, val_examples=None, device="cpu"):
        calls.append(lr)
        loss = math.inf if lr > 1 else 0.1 + (math.log10(lr) + 2) ** 2  # diverges above lr 1
        return ev.RunCurve([loss] * steps, [0.5] * steps, 1.0, not math.isfinite(loss))

    monkeypatch.setattr(ev.protocol, "run_method", run_method)
    first = ev.tune_lr(TaskSpec(), "sgd", 4, tuning_seeds=1, cache=tmp_path)
    (path,) = tmp_path.glob("*.json")
    assert loads_strict(path.read_text())["lr"] == pytest.approx(first["lr"]) == pytest.approx(1e-2)
    n = len(calls)

    entry = loads_strict(path.read_text())
    entry["grid"] = {k: None for k in entry["grid"]}  # scores that were not finite when written
    path.write_text(json.dumps(entry))
    assert ev.tune_lr(TaskSpec(), "sgd", 4, tuning_seeds=1, cache=tmp_path)["lr"] == first["lr"]
    assert len(calls) == n  # read back from the cache

    for broken in ('{"lr": null}', '{"lr": -1}', "not json", "[1, 2]"):
        path.write_text(broken)
        again = ev.tune_lr(TaskSpec(), "sgd", 4, tuning_seeds=1, cache=tmp_path)
        assert again["lr"] == pytest.approx(first["lr"]) and len(calls) > n  # tuned again ...
        assert loads_strict(path.read_text())["lr"] == pytest.approx(first["lr"])  # ... and rewritten
        n = len(calls)


# ------------------------------------------------------------------------------- analyze
def test_analyze_json_and_file_are_strict_when_the_rule_diverges(diverging_rule: Path, tmp_path: Path) -> None:
    res = run_without_warnings("analyze", diverging_rule, "--family", "tabular-mlp", "--steps", "3",
                               "--adam-lr", "0.01", "--json", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    doc = loads_strict(res.stdout)
    assert loads_strict((tmp_path / "analysis.json").read_text()) == doc
    learned, fa = doc["rules"]
    assert learned["diverged"] is True and doc["diverged"] is True
    assert fa["diverged"] is False and doc["adam_diverged"] is False
    # cosines against the gradient of a blown-up network are undefined (nan in memory): null here
    assert any(v is None for layer in learned["layers"] for v in layer["cos_to_grad"])
    assert all(v is not None for layer in fa["layers"] for v in layer["cos_to_grad"])


# ------------------------------------------------------------------------ tools/results.py
def _results_tool():
    spec = importlib.util.spec_from_file_location("results_tool", ROOT / "tools" / "results.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["results_tool"] = module
    spec.loader.exec_module(module)
    return module


def test_results_tool_writes_strict_suites_and_reads_null_back(monkeypatch: pytest.MonkeyPatch,
                                                               tmp_path: Path) -> None:
    results = _results_tool()
    steps = 4

    def evaluate(tasks, rule, **kwargs):
        out = []
        for spec, _ in tasks:
            adam = [ev.RunCurve([1.0 - 0.1 * k - 0.01 * s for k in range(steps)], [0.5] * steps, 1.0) for s in range(2)]
            blown = [ev.RunCurve([1.0] + [math.inf] * (steps - 1), [0.5] + [math.nan] * (steps - 1), 1.0, True)] * 2
            out.append(ev.TaskResult(spec, steps, {"adam": 0.01}, {m: adam if m != "learned" else blown
                                                                   for m in ev.METHODS}))
        return out

    monkeypatch.setattr(results.ev, "evaluate", evaluate)
    rule_file = tmp_path / "rule.pt"
    rule_file.write_bytes(b"rule")
    args = argparse.Namespace(out=str(tmp_path), steps=steps, seeds=2, tasks=1, family="tabular-mlp", tuning_seeds=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        doc = results._suite(args, "heldout", None, rule_file)
    written = loads_strict((tmp_path / "heldout.json").read_text())
    assert written["methods"]["learned"]["val_loss_mean"] is None and written["methods"]["learned"]["diverged"] == 2
    table = results._table(doc)
    learned_row = next(line for line in table if "**learned**" in line)
    assert "n/a" in learned_row and "2 runs diverged" in learned_row

    def must_not_run(*_a, **_k):
        raise AssertionError("the suite in OUT should have been reused")

    monkeypatch.setattr(results.ev, "evaluate", must_not_run)
    assert results._table(results._suite(args, "heldout", None, rule_file)) == table
