"""mpbackprop analyze: alignment of a rule's backward signal with the true gradient."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
from click.testing import CliRunner

import mpbackprop as mp
from mpbackprop.cli import main
from mpbackprop.evaluation import analyze
from mpbackprop.rules import Adam, Exact, FeedbackAlignment


def _digits_setup(seed=0):
    train, valid = mp.tasks.load_dataset("digits", 0)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 10)).double()
    net = mp.compile(model, (64,))
    gen = torch.Generator().manual_seed(seed)

    def batches():
        idx = torch.randint(0, len(train.x), (32,), generator=gen)
        return train.x[idx].double(), train.y[idx]

    def evaluate(theta):
        return torch.nn.functional.cross_entropy(net(valid.x.double(), theta), valid.y)

    return net, batches, evaluate


def test_exact_rule_is_perfectly_aligned_at_every_layer_and_step():
    net, batches, evaluate = _digits_setup()
    an = analyze(net, net.values.clone(), batches, evaluate, Exact(), Adam(1e-2), 15)
    assert len(an.layers) == 3
    for s in an.layers:
        assert len(s.cos_to_grad) == 15
        assert all(abs(c - 1) < 1e-10 for c in s.cos_to_grad)
        assert all(abs(r - 1) < 1e-10 for r in s.norm_ratio)
        assert all(c > 1 - 1e-10 for c in s.update_cos_to_adam)  # same update rule, same gradients
    assert an.val_loss[-1] < an.val_loss[0]


def test_feedback_alignment_aligns_over_training():
    net, batches, evaluate = _digits_setup()
    an = analyze(net, net.values.clone(), batches, evaluate, FeedbackAlignment(seed=0), Adam(1e-2), 150)
    first = an.layers[0]  # two random feedback matrices away from the loss
    assert max(first.cos_to_grad) < 0.999
    early = sum(first.cos_to_grad[:15]) / 15
    late = sum(first.cos_to_grad[-15:]) / 15
    assert late > early + 0.1, (early, late)
    assert all(abs(c - 1) < 1e-9 for c in an.layers[-1].cos_to_grad)  # the last layer gets the true error


def test_analyze_command_writes_json_plots_and_summary(tmp_path):
    res = CliRunner().invoke(main, ["analyze", "fa", "--family", "tabular-mlp", "--steps", "12", "--adam-lr", "0.01",
                                    "--json", "--out", str(tmp_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["steps"] == 12 and doc["layers"]
    assert all(len(layer["cos_to_grad"]) == 12 and len(layer["norm_ratio"]) == 12 for layer in doc["layers"])
    for name in ("analysis.json", "alignment.png", "update_alignment.png", "curves.png", "summary.md"):
        assert (tmp_path / name).stat().st_size > 1000 or name == "summary.md", name
    assert list(tmp_path.glob("messages-*.png"))
    assert "cos (start)" in (tmp_path / "summary.md").read_text()
    res = CliRunner().invoke(main, ["analyze", str(tmp_path / "nope.pt"), "--steps", "3", "--adam-lr", "0.01"])
    assert res.exit_code == 2 and "no such rule" in res.output


def test_tensorboard_event_files(tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"family": "tabular-mlp", "outer_steps": 2, "unroll": [4, 6], "truncation": 2,
                               "tasks_per_step": 1, "eval_every": 2, "eval_tasks": 1, "eval_horizon": 3,
                               "val_examples": 16, "state_dim": 1, "hidden": 4}))
    res = CliRunner().invoke(main, ["meta-train", "--config", str(cfg), "--out", str(tmp_path / "run"),
                                    "--no-progress", "--tensorboard", str(tmp_path / "tb")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("meta_train/meta_loss")] == [1, 2]


def test_report_refuses_a_message_step_outside_the_run():
    from mpbackprop.evaluation import analysis
    from mpbackprop.tasks import get_family

    spec = get_family("tabular-mlp").tasks("heldout", 1)[0]
    for bad in (5, 17, -1):  # 0-based: steps 0..4 exist (was silently clamped to the last)
        with pytest.raises(ValueError, match=f"message_step must be in 0..4 .*got {bad}"):
            analysis.report("fa", spec, 5, 0, None, message_step=bad, adam_lr=0.01)
