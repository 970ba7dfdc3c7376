"""Meta-training run directories: interruption at any point, the lock, overwriting, damaged
metrics, changed settings on resume, strict JSON, a full disk, config validation and seeds.

The reference is one uninterrupted tiny run; every interrupted-then-resumed run must end with the
same metrics (all but the timings) and bit-identical rules.
"""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from mpbackprop._json import loads_strict
from mpbackprop.cli import main
from mpbackprop.errors import GraphFileError
from mpbackprop.metatrain import MetaConfig, MetaTrainer, estimators, interrupts, loop, rundir
from mpbackprop.metatrain.estimators import Estimate
from mpbackprop.metatrain.rundir import DiskFullError, RunDirectoryError

# eval at 3 and 5, checkpoints at 4 and 5: steps 1-3 end between checkpoints
TINY = dict(family="tabular-mlp", outer_steps=5, unroll=(6, 10), truncation=3, tasks_per_step=2, eval_every=3,
            eval_tasks=1, eval_horizon=4, checkpoint_every=4, val_examples=32, state_dim=1, hidden=4)
CFG = MetaConfig(**TINY)


def _quiet(_: str) -> None:
    pass


def _metrics(run: Path) -> list[dict]:
    rows = [loads_strict(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


def _tensors(path: Path) -> list[torch.Tensor]:
    blob = torch.load(path, weights_only=True)
    return list(blob["backward_state"].values()) + list(blob["update_state"].values())


def _state_step(run: Path) -> int:
    return int(torch.load(run / "state.pt", weights_only=True)["step"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("reference") / "run"
    MetaTrainer(CFG, run, notify=_quiet).run(progress=False)
    return run


def assert_same_run(run: Path, reference: Path) -> None:
    assert _metrics(run) == _metrics(reference)
    for name in ("rule.pt", "best.pt"):
        for a, b in zip(_tensors(run / name), _tensors(reference / name), strict=True):
            assert torch.equal(a, b), name
    assert _state_step(run) == CFG.outer_steps


def _signal_when(monkeypatch: pytest.MonkeyPatch, module: object, trainer: MetaTrainer, step: int,
                 signals: tuple[int, ...], call: int = 1) -> list[int]:
    """Send ``signals`` to this process at the ``call``-th call of ``module.unroll`` (the estimators:
    ``unroll_copies``, a task slot's ES/PES copies) while ``trainer.step == step`` (inside an estimate or a
    validation, before an inner truncation)."""
    name = "unroll_copies" if module is estimators else "unroll"
    real = getattr(module, name)
    seen: list[int] = []

    def unroll(*args, **kwargs):
        if trainer.step == step:
            seen.append(1)
            if len(seen) == call:
                for sig in signals:
                    os.kill(os.getpid(), sig)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, unroll)
    return seen


# ------------------------------------------------------------------------------------ signals
@pytest.mark.parametrize("where, module, step, call, sig, saved", [
    ("initial validation", loop, 0, 1, signal.SIGINT, 0),
    ("estimate, second task", estimators, 1, 2, signal.SIGTERM, 2),  # during outer step 2
    ("validation at step 3", loop, 3, 2, signal.SIGINT, 3),
])
def test_a_signal_anywhere_finishes_the_step_saves_and_resume_is_exact(tmp_path, monkeypatch, reference, where,
                                                                        module, step, call, sig, saved):
    trainer = MetaTrainer(CFG, tmp_path, notify=_quiet)
    seen = _signal_when(monkeypatch, module, trainer, step, (sig,), call)
    handlers = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    summary = trainer.run(progress=False)
    assert len(seen) >= call, "the signal was not sent"
    assert summary.interrupted and not summary.stopped_at_once and summary.signal == signal.Signals(sig).name
    assert summary.steps == summary.saved_step == saved == _state_step(tmp_path)
    assert [r["step"] for r in _metrics(tmp_path)] == list(range(saved + 1))  # the step's line is there
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers  # restored
    monkeypatch.undo()
    MetaTrainer(CFG, tmp_path, resume=True, notify=_quiet).run(progress=False)
    assert_same_run(tmp_path, reference)


@pytest.mark.parametrize("repeat_after, at_once", [(0.0, True), (1000.0, False)])
def test_a_second_signal_stops_at_once_and_leaves_the_last_checkpoint(tmp_path, monkeypatch, reference,
                                                                       repeat_after, at_once):
    """Two signals inside outer step 5: at once (nothing saved after the checkpoint at step 4) —
    unless the second comes within REPEAT_AFTER_S, when it is the same request (torchrun's echo)."""
    monkeypatch.setattr(interrupts, "REPEAT_AFTER_S", repeat_after)
    trainer = MetaTrainer(CFG, tmp_path, notify=_quiet)
    _signal_when(monkeypatch, estimators, trainer, 4, (signal.SIGINT, signal.SIGINT))
    summary = trainer.run(progress=False)
    assert summary.interrupted == at_once and summary.stopped_at_once == at_once
    assert summary.saved_step == _state_step(tmp_path) == (4 if at_once else 5)
    assert [r["step"] for r in _metrics(tmp_path)][-1] == (4 if at_once else 5)
    assert not list(tmp_path.glob(".*.tmp"))  # no half-written file left behind
    monkeypatch.undo()
    MetaTrainer(CFG, tmp_path, resume=True, notify=_quiet).run(progress=False)
    assert_same_run(tmp_path, reference)


def test_cli_exits_130_after_a_signal_and_names_the_saved_step(tmp_path, monkeypatch):
    real = MetaTrainer.validate

    def validate(self):
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self)

    monkeypatch.setattr(MetaTrainer, "validate", validate)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CFG.to_json()))
    res = CliRunner().invoke(main, ["meta-train", "--config", str(cfg), "--out", str(tmp_path / "run"),
                                    "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 130, res.output
    assert "interrupted (SIGTERM): finished and saved step 3" in res.stderr and "--resume" in res.stderr
    assert _state_step(tmp_path / "run") == 3


# --------------------------------------------------------------------------- the run directory
def test_a_directory_locked_by_another_process_is_refused_with_its_pid(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, str(os.getpid()).encode()); print('locked', flush=True); time.sleep(120)",
         str(run / rundir.LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirectoryError, match=rf"{run} is in use by another meta-train run \(pid {holder.pid}\)"):
            MetaTrainer(CFG, run, notify=_quiet)
        assert sorted(p.name for p in run.iterdir()) == [rundir.LOCK_NAME]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    trainer = MetaTrainer(CFG, run, notify=_quiet)  # the holder is gone: its lock went with it
    assert trainer.lock.held
    trainer.lock.release()


def test_an_existing_run_is_kept_unless_overwrite(tmp_path, reference):
    run = tmp_path / "run"
    MetaTrainer(CFG.replace(outer_steps=1, seed=3), run, notify=_quiet).run(progress=False)
    (run / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(RunDirectoryError, match="already holds a meta-training run"):
        MetaTrainer(CFG, run, notify=_quiet)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    MetaTrainer(CFG, run, overwrite=True, notify=_quiet).run(progress=False)
    assert_same_run(run, reference)
    assert (run / "notes.txt").read_text() == "mine"  # --overwrite removes the run's files only


def test_a_torn_last_metrics_line_is_dropped_and_said(tmp_path, reference):
    MetaTrainer(CFG.replace(outer_steps=3), tmp_path, notify=_quiet).run(progress=False)  # 3: validated, as in CFG
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 4, "meta_loss": 0.12')  # cut off: no newline
    notes: list[str] = []
    MetaTrainer(CFG, tmp_path, resume=True, notify=notes.append).run(progress=False)
    assert any("metrics.jsonl: dropped its last line 5" in n for n in notes), notes
    assert any("outer_steps" in n and "from 3 to 5" in n for n in notes), notes
    assert_same_run(tmp_path, reference)


def test_read_metrics_keeps_a_complete_last_line_and_refuses_other_damage(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "meta_loss": NaN}\n{"step": 1}')  # an old NaN, a last line without newline
    rows, note = rundir.read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1] and note is None
    path.write_text('{"step": 0}\n{"stp": 1}\n{"step": 2}\n')
    with pytest.raises(RunDirectoryError, match="metrics.jsonl: line 2 is damaged"):
        rundir.read_metrics(path)


def test_resume_refuses_changed_settings_and_accepts_the_saved_ones(tmp_path, reference):
    MetaTrainer(CFG.replace(outer_steps=3), tmp_path, notify=_quiet).run(progress=False)
    with pytest.raises(RunDirectoryError) as info:
        MetaTrainer({"meta_lr": 0.5, "truncation": 3, "eval_tasks": 2}, tmp_path, resume=True, notify=_quiet)
    message = str(info.value)
    assert f"meta_lr=0.5 (saved: {CFG.meta_lr})" in message and "eval_tasks=2 (saved: 1)" in message
    assert "truncation" not in message.split(";")[0]  # equal to the saved value: fine
    assert "--outer-steps, --threads, --progress and --tensorboard may change" in message
    trainer = MetaTrainer({"truncation": 3, "outer_steps": 5, "seed": 0}, tmp_path, resume=True, notify=_quiet)
    assert trainer.cfg == CFG
    trainer.run(progress=False)
    assert_same_run(tmp_path, reference)


def test_resume_compares_the_flags_with_the_saved_run_not_with_the_defaults(tmp_path, reference):
    """--unroll 6,10 alone would be refused against the default truncation (20 > 10); on --resume it
    is compared with the run's config.json only, where it is the saved value."""
    MetaTrainer(CFG.replace(outer_steps=3), tmp_path, notify=_quiet).run(progress=False)
    with pytest.raises(ValueError, match="truncation must not exceed"):
        MetaConfig().replace(unroll=CFG.unroll)  # what the flags were checked against before
    res = CliRunner().invoke(main, ["meta-train", "--out", str(tmp_path), "--resume", "--unroll", "6,10",
                                    "--outer-steps", "5", "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert_same_run(tmp_path, reference)
    res = CliRunner().invoke(main, ["meta-train", "--out", str(tmp_path), "--resume", "--unroll", "5,8",
                                    "--no-progress"], catch_exceptions=False)
    assert res.exit_code == 2
    assert "unroll=[5, 8] (saved: [6, 10])" in res.stderr and "truncation" not in res.stderr, res.stderr


def test_a_bad_state_file_never_suggests_unsafe_loading(tmp_path):
    MetaTrainer(CFG.replace(outer_steps=1), tmp_path, notify=_quiet).run(progress=False)
    torch.save(argparse.Namespace(step=1), tmp_path / "state.pt")  # weights_only refuses the class
    with pytest.raises(GraphFileError) as info:
        MetaTrainer(CFG, tmp_path, resume=True, notify=_quiet)
    message = str(info.value)
    assert "not a readable meta-training state" in message and "--overwrite" in message
    assert "weights_only" not in message and "\n" not in message


# --------------------------------------------------------------------------------- strict JSON
def assert_strict_json_run(run: Path) -> None:
    """Every JSON document of the run directory parses as strict JSON."""
    loads_strict((run / "config.json").read_text())
    for line in (run / "metrics.jsonl").read_text().splitlines():
        loads_strict(line)
    for name in ("rule.pt", "best.pt"):
        blob = torch.load(run / name, weights_only=True)
        for text in (blob["meta"], blob["backward"]["config"], blob["update"]["config"]):
            loads_strict(text)


def test_every_json_file_of_a_run_is_strict_even_with_a_skipped_step(tmp_path, monkeypatch):
    trainer = MetaTrainer(CFG.replace(outer_steps=3), tmp_path, notify=_quiet)
    real = trainer.estimator.estimate

    def non_finite():
        est = real()
        return Estimate(est.grad * math.nan, math.nan) if trainer.step == 1 else est

    monkeypatch.setattr(trainer.estimator, "estimate", non_finite)
    trainer.run(progress=False)
    assert_strict_json_run(tmp_path)
    rows = _metrics(tmp_path)
    assert rows[0]["meta_loss"] is None and rows[0]["grad_norm"] is None
    assert rows[2]["skipped"] is True and rows[2]["meta_loss"] is None and rows[2]["grad_norm"] is None
    assert loads_strict((tmp_path / "config.json").read_text()) == CFG.replace(outer_steps=3).to_json()


# ----------------------------------------------------------------------------------- disk full
def test_a_full_disk_stops_with_one_line_and_the_run_resumes_exactly(tmp_path, monkeypatch, reference):
    real = loop.atomic_torch_save

    def full_at_step_5(state, path):
        if state["step"] == 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(state, path)

    monkeypatch.setattr(loop, "atomic_torch_save", full_at_step_5)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(CFG.to_json()))
    run = tmp_path / "run"
    res = CliRunner().invoke(main, ["meta-train", "--config", str(cfg), "--out", str(run), "--no-progress"],
                             catch_exceptions=False)
    assert res.exit_code == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("Error: ")]
    assert errors == [f"Error: no space left on device writing {run / 'state.pt'}; the run is intact at step 4 "
                      "(continue with --resume once there is space)"], res.stderr
    assert _state_step(run) == 4
    monkeypatch.undo()
    res = CliRunner().invoke(main, ["meta-train", "--out", str(run), "--resume", "--no-progress"],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert_same_run(run, reference)


def test_a_failed_metrics_append_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0}\n')
    real_write = os.write

    def half_then_full(fd, data):
        if len(data) > 4:
            return real_write(fd, bytes(data[:4]))
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched, pytest.raises(DiskFullError, match=rf"writing {path}; the run is intact at step 7"):
        patched.setattr(rundir.os, "write", half_then_full)
        with rundir.disk_full_guard(path, 7):
            rundir.append_line(path, '{"step": 1, "meta_loss": 0.5}\n')
    assert path.read_text() == '{"step": 0}\n'
    with pytest.raises(DiskFullError, match="no checkpoint was written yet"):
        with rundir.disk_full_guard(path, None):
            raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError):  # other errors pass through unchanged
        with rundir.disk_full_guard(path, 7):
            raise PermissionError(errno.EACCES, "Permission denied")


# ------------------------------------------------------------------------- config validation
@pytest.mark.parametrize("field, value, allowed", [
    ("eval_every", 0, "an integer >= 1"), ("checkpoint_every", 0, "an integer >= 1"),
    ("val_examples", 0, "an integer >= 1"), ("eval_tasks", 0, "an integer >= 1"), ("state_dim", 0, "an integer in 1..8"), ("hidden", 5000, "an integer in 1..1024"),
    ("eval_multiples", [], "a list of 1 to 8 integers"), ("update_rule", "adam", "one of scheduled, learned"),
    ("es_pairs", 0, "an integer >= 1"), ("eval_horizon", 0, "an integer >= 1"),
    ("outer_steps", 2.7, "an integer >= 0"), ("outer_steps", True, "an integer >= 0"), ("outer_steps", -1, "an integer >= 0"),
    ("clip_norm", 0.0, "a finite number > 0"), ("diverge_factor", 0, "a finite number > 1"),
    ("meta_lr", -1.0, "a finite number > 0"), ("meta_lr", math.nan, "a finite number > 0"),
    ("meta_lr", math.inf, "a finite number > 0"), ("update_lr", "0.01", "a finite number > 0"),
    ("es_sigma", 0.0, "a finite number > 0"), ("final_weight", 1.5, "a number in [0, 1]"),
    ("seed", -1, "an integer in 0..4294967295"), ("seed", 2**40, "an integer in 0..4294967295"),
    ("unroll", (0, 4), "a pair [lo, hi]"), ("unroll", (1.5, 4), "a pair [lo, hi]"),
    ("weight_input", 1, "true or false"), ("estimator", "sgd", "one of tbptt, es, pes"),
])
def test_config_values_are_refused_saying_what_is_allowed(field, value, allowed):
    with pytest.raises(ValueError, match=rf"^{field} must be {re.escape(allowed)}"):
        MetaConfig(**{**TINY, field: value})


def test_config_values_take_their_canonical_types():
    cfg = MetaConfig(**{**TINY, "meta_lr": 1, "unroll": [6, 10]})
    assert type(cfg.meta_lr) is float and cfg.unroll == (6, 10)
    assert MetaConfig.from_json(loads_strict(cfg.dumps())) == cfg
    with pytest.raises(ValueError, match="truncation must not exceed the longest unroll"):
        MetaConfig(**{**TINY, "unroll": (2, 2)})


@pytest.mark.parametrize("changes", [{"eval_every": 0}, {"state_dim": 0}, {"outer_steps": 2.5}])
def test_nothing_is_written_before_the_config_is_valid(tmp_path, changes):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({**CFG.to_json(), **changes}))
    res = CliRunner().invoke(main, ["meta-train", "--config", str(cfg), "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and not (tmp_path / "run").exists()


# -------------------------------------------------------------------------------------- seeds
@pytest.mark.parametrize("global_seed, flag_seed, config_seed, expected", [
    (None, 3, 7, 3), (5, 3, 7, 3), (5, None, 7, 5), (None, None, 7, 7), (None, None, None, 0),
])
def test_seed_precedence(tmp_path, global_seed, flag_seed, config_seed, expected):
    settings = {**CFG.to_json(), "outer_steps": 0}
    settings.pop("seed")
    if config_seed is not None:
        settings["seed"] = config_seed
    (tmp_path / "cfg.json").write_text(json.dumps(settings))
    argv = (["--seed", str(global_seed)] if global_seed is not None else []) + [
        "meta-train", "--config", str(tmp_path / "cfg.json"), "--out", str(tmp_path / "run"), "--no-progress"]
    argv += ["--seed", str(flag_seed)] if flag_seed is not None else []
    res = CliRunner().invoke(main, argv, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "run" / "config.json").read_text())["seed"] == expected
    assert f"seed {expected}" in res.stderr


def test_the_seed_options_have_the_configs_bound(tmp_path):
    from mpbackprop import cli

    top = cli.META_SEED.hi
    assert MetaConfig(**{**TINY, "seed": top}).seed == top
    with pytest.raises(ValueError, match=rf"^seed must be an integer in 0\.\.{top} "):
        MetaConfig(**{**TINY, "seed": top + 1})
    assert cli.SEED.hi > top  # the global --seed allows more: meta-train refuses it, naming it
    res = CliRunner().invoke(main, ["--seed", str(top + 1), "meta-train", "--outer-steps", "0", "--out",
                                    str(tmp_path / "run"), "--no-progress"])
    assert res.exit_code == 2
    assert f"Error: the global --seed {top + 1} is out of range for meta-train" in res.stderr, res.stderr
