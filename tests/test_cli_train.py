"""CLI: verify, meta-train and evaluate (through click's CliRunner)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mpbackprop.cli import main
from mpbackprop.evaluation import METHODS

verify_module = importlib.import_module("mpbackprop.evaluation.verify")  # packages export verify() under that name

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TINY = {"family": "tabular-mlp", "outer_steps": 2, "unroll": [6, 8], "truncation": 3, "tasks_per_step": 1,
        "eval_every": 2, "eval_tasks": 1, "eval_horizon": 4, "checkpoint_every": 1, "val_examples": 32,
        "state_dim": 2, "hidden": 4}


def run(*args: object):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("example", ["convnet.py", "resmlp.py", "mlp_gelu.py"])
def test_verify_passes_on_examples(example):
    res = run("verify", EXAMPLES / example, "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["ok"] is True and doc["max_abs_err"] <= 1e-10 and doc["layers"]
    res = run("verify", EXAMPLES / example, "--rule", "fa", "--dtype", "float32")
    assert res.exit_code == 0 and "OK" in res.output


def test_verify_exits_1_when_the_engine_disagrees(monkeypatch):
    real = verify_module.signals

    def wrong(*args, **kwargs):
        sig, loss = real(*args, **kwargs)
        return sig * 1.01, loss

    monkeypatch.setattr(verify_module, "signals", wrong)
    res = run("verify", EXAMPLES / "mlp_relu.py")
    assert res.exit_code == 1 and "FAIL" in res.output


def test_verify_bad_input_exits_2(tmp_path):
    res = run("verify", EXAMPLES / "bad" / "bad_maxpool.py")
    assert res.exit_code == 2 and "MaxPool2d" in res.output and "bad_maxpool.py" in res.output
    res = run("verify", EXAMPLES / "mlp_relu.py", "--input-shape", "5")
    assert res.exit_code == 2 and "input shape 5" in res.output


def test_meta_train_resume_and_evaluate(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    res = run("meta-train", "--config", cfg, "--out", out, "--no-progress")
    assert res.exit_code == 0, res.output
    for name in ("config.json", "rule.pt", "best.pt", "state.pt", "metrics.jsonl", "meta_loss.png"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["family"] == "tabular-mlp"
    res = run("meta-train", "--config", cfg, "--out", out, "--resume", "--outer-steps", "3", "--no-progress")
    assert res.exit_code == 0, res.output
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [0, 1, 2, 3]
    # --resume without --outer-steps keeps the run's own length (3), not the default
    res = run("meta-train", "--out", out, "--resume", "--no-progress")
    assert res.exit_code == 0, res.output
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    assert json.loads((out / "config.json").read_text())["outer_steps"] == 3

    res = run("evaluate", out, "--family", "tabular-mlp", "--steps", "4", "--seeds", "2", "--tasks", "1",
              "--tuning-seeds", "1", "--json", "--no-progress", "--out", tmp_path / "ev", "--plot",
              tmp_path / "curves.png")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["steps"] == 4 and doc["seeds"] == 2 and len(doc["tasks"]) == 1
    assert set(doc["methods"]) == set(METHODS)
    for entry in doc["methods"].values():
        for key in ("val_loss_mean", "val_loss_ci", "val_acc_mean", "speedup_vs_adam", "ms_per_step"):
            assert key in entry
        assert len(entry["val_loss_ci"]) == 2
    assert doc["tasks"][0]["methods"]["adam"]["paired_diff_vs_adam"]["mean"] == 0.0
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "ev" / "results.json").is_file() and (tmp_path / "ev" / "report.txt").is_file()
    assert any((tmp_path / "ev" / "tuning").iterdir())  # tuning results are cached


def test_meta_train_and_evaluate_refuse_bad_input(tmp_path):
    res = run("meta-train", "--family", "nope", "--out", tmp_path / "x", "--no-progress")
    assert res.exit_code == 2 and "family must be one of digits-mlp" in res.output and "nope" in res.output
    res = run("meta-train", "--out", tmp_path / "empty", "--resume", "--no-progress")
    assert res.exit_code == 2 and "nothing to resume" in res.output
    bad = tmp_path / "bad.json"
    bad.write_text('{"outer_steps": 2, "famliy": "digits-mlp"}')
    res = run("meta-train", "--config", bad, "--no-progress")
    assert res.exit_code == 2 and "famliy" in res.output
    res = run("meta-train", "--unroll", "9,3", "--no-progress")
    assert res.exit_code == 2 and "unroll" in res.output
    res = run("evaluate", tmp_path / "missing")
    assert res.exit_code == 2 and "no such rule" in res.output
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"junk")
    res = run("evaluate", junk)
    assert res.exit_code == 2 and "junk.pt" in res.output
    torch.save({"a": 1}, tmp_path / "foreign.pt")
    res = run("evaluate", tmp_path / "foreign.pt")
    assert res.exit_code == 2 and "not an mpbackprop rule" in res.output
