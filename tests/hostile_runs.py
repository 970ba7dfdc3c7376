"""Hostile input, area ``runs``: ``meta-train`` run directories, resume, flags and config values.

Cases that need a real run directory copy one tiny run made once per session (:func:`_run_copy`).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from hostile import BAD_INPUT, Case

TINY = {"family": "tabular-mlp", "outer_steps": 2, "unroll": [4, 6], "truncation": 2, "tasks_per_step": 1,
        "eval_every": 2, "eval_tasks": 1, "eval_horizon": 3, "checkpoint_every": 1, "val_examples": 16,
        "state_dim": 1, "hidden": 4, "learn_backward": True}
_made: list[Path] = []
_held: list[Any] = []  # locks held for the rest of the session by the lock case


def _template() -> Path:
    """A finished tiny run (made on first use)."""
    if not _made:
        from mpbackprop.metatrain import MetaConfig, MetaTrainer

        root = Path(tempfile.mkdtemp(prefix="hostile-runs-"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        MetaTrainer(MetaConfig(**TINY), root / "run", notify=lambda _: None).run(progress=False)
        _made.append(root / "run")
    return _made[0]


def _run_copy(then: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    """Setup: ``{tmp}/run`` is a copy of the tiny run, then ``then(run)`` damages it."""

    def setup(tmp: Path) -> None:
        shutil.copytree(_template(), tmp / "run")
        if then is not None:
            then(tmp / "run")

    return setup


def _hold_lock(tmp: Path) -> None:
    from mpbackprop.metatrain.rundir import RunLock

    lock = RunLock(tmp / "run")
    lock.acquire()
    _held.append(lock)
    (tmp / "run" / "config.json").write_text("{}")


def _damage_metrics_line_2(run: Path) -> None:
    lines = (run / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = '{"step": 1, "meta_loss": 0.5, oops\n'
    (run / "metrics.jsonl").write_text("".join(lines))


def _state(content: Callable[[Path], None]) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        (tmp / "run").mkdir()
        (tmp / "run" / "config.json").write_text(json.dumps(TINY))
        content(tmp / "run" / "state.pt")

    return setup


def _wider_rule_state(run: Path) -> None:
    """state.pt with the backward rule's tensors of a run with hidden 8 (the run's config says 4)."""
    import torch

    from mpbackprop.rules import LearnedBackward

    state = torch.load(run / "state.pt", weights_only=True)
    state["rule"] = LearnedBackward(state_dim=1, hidden=8).state_dict()
    torch.save(state, run / "state.pt")


def _saved(field: str) -> str:
    """How a refusal of --resume shows the tiny run's saved value of a field it leaves at the default."""
    from mpbackprop.metatrain import MetaConfig

    return json.dumps(getattr(MetaConfig(), field))


def _torch_save(obj: Any) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        import torch

        torch.save(obj, path)

    return write


def _meta_train(*args: str) -> list[str]:
    return ["meta-train", *args, "--no-progress"]


def _config_case(name: str, changes: dict[str, Any], fragment: str) -> Case:
    return Case(f"runs-config-{name}", _meta_train("--config", "{tmp}/cfg.json", "--out", "{tmp}/run"), BAD_INPUT,
                fragment, files={"cfg.json": json.dumps({**TINY, **changes})})


CASES: list[Case] = [
    # --- the run directory
    Case("runs-existing-run-needs-resume-or-overwrite", _meta_train("--out", "{tmp}/run"), BAD_INPUT,
         "already holds a meta-training run; continue it with --resume, or start it anew with --overwrite",
         files={"run/config.json": "{}"}),
    Case("runs-directory-in-use", _meta_train("--out", "{tmp}/run", "--overwrite"), BAD_INPUT,
         f"is in use by another meta-train run (pid {os.getpid()})", setup=_hold_lock),
    Case("runs-resume-and-overwrite", _meta_train("--out", "{tmp}/run", "--resume", "--overwrite"), BAD_INPUT,
         "give one of them", setup=_run_copy()),
    Case("runs-nothing-to-resume", _meta_train("--out", "{tmp}/none", "--resume"), BAD_INPUT, "nothing to resume"),
    # --- resume keeps the run's settings
    Case("runs-resume-changed-flags", _meta_train("--out", "{tmp}/run", "--resume", "--meta-lr", "0.5",
                                                  "--truncation", "2"), BAD_INPUT,
         f"meta_lr=0.5 (saved: {_saved('meta_lr')})", setup=_run_copy()),
    Case("runs-resume-changed-seed", _meta_train("--out", "{tmp}/run", "--resume", "--seed", "9"), BAD_INPUT,
         "seed=9 (saved: 0)", setup=_run_copy()),
    Case("runs-resume-changed-global-seed", ["--seed", "4", *_meta_train("--out", "{tmp}/run", "--resume")], BAD_INPUT,
         "seed=4 (saved: 0)", setup=_run_copy()),
    Case("runs-resume-changed-config-file", _meta_train("--out", "{tmp}/run", "--resume", "--config", "{tmp}/cfg.json"),
         BAD_INPUT, "eval_tasks=2 (saved: 1)", files={"cfg.json": json.dumps({**TINY, "eval_tasks": 2})},
         setup=_run_copy()),
    Case("runs-resume-damaged-config", _meta_train("--out", "{tmp}/run", "--resume"), BAD_INPUT,
         "config.json: cannot resume with this config",
         setup=_run_copy(lambda run: (run / "config.json").write_text("{not json"))),
    Case("runs-resume-damaged-metrics-line", _meta_train("--out", "{tmp}/run", "--resume"), BAD_INPUT,
         "metrics.jsonl: line 2 is damaged", setup=_run_copy(_damage_metrics_line_2)),
    Case("runs-resume-garbage-last-metrics-line", _meta_train("--out", "{tmp}/run", "--resume"), BAD_INPUT,
         "line 4 is damaged", setup=_run_copy(lambda run: open(run / "metrics.jsonl", "a").write("garbage\n"))),
    Case("runs-resume-garbage-state", _meta_train("--out", "{tmp}/run", "--resume"), BAD_INPUT,
         "state.pt: not a readable meta-training state",
         setup=_state(lambda p: p.write_bytes(b"not a checkpoint"))),
    Case("runs-resume-unsafe-state", _meta_train("--out", "{tmp}/run", "--resume"), BAD_INPUT,
         "start a new run with --overwrite, or restore the run directory from a backup",
         setup=_state(_torch_save(argparse.Namespace(step=3)))),
    Case("runs-resume-foreign-state", _meta_train("--out", "{tmp}/run", "--resume"), BAD_INPUT,
         "not a meta-training state (a torch file of another kind)", setup=_state(_torch_save({"step": 3}))),
    Case("runs-resume-state-of-another-width", _meta_train("--out", "{tmp}/run", "--resume", "--outer-steps", "3"),
         BAD_INPUT, "its rule state does not fit the run's config.json: coef_mlp.0.weight has shape [8, 4], the config "
                    "needs [4, 4]; coef_mlp.0.bias has shape [8]", setup=_run_copy(_wider_rule_state)),
    # --- flags
    Case("runs-meta-lr-negative", _meta_train("--meta-lr", "-1"), BAD_INPUT, "-1 is not allowed; give a finite number > 0"),
    Case("runs-meta-lr-nan", _meta_train("--meta-lr", "nan"), BAD_INPUT, "give a finite number > 0"),
    Case("runs-meta-lr-inf", _meta_train("--meta-lr", "inf"), BAD_INPUT, "give a finite number > 0"),
    Case("runs-meta-lr-word", _meta_train("--meta-lr", "fast"), BAD_INPUT, "'fast' is not a number"),
    Case("runs-threads-huge", _meta_train("--threads", "100000"), BAD_INPUT, "1 <= threads <= 256"),
    Case("runs-threads-zero", _meta_train("--threads", "0"), BAD_INPUT, "1 <= threads <= 256"),
    Case("runs-threads-env", _meta_train(), BAD_INPUT, "1 <= threads <= 256 (from MPBACKPROP_META_TRAIN_THREADS)",
         env={"MPBACKPROP_META_TRAIN_THREADS": "0"}),
    Case("runs-seed-negative", _meta_train("--seed", "-1"), BAD_INPUT, "'--seed': -1 is out of range; allowed: 0 <= seed < 2**32"),
    Case("runs-seed-2**32", _meta_train("--seed", str(2**32)), BAD_INPUT, "allowed: 0 <= seed < 2**32"),
    Case("runs-global-seed-out-of-range", ["--seed", "-3", *_meta_train()], BAD_INPUT,
         "'--seed': -3 is out of range; allowed: 0 <= seed < 2**63"),
    Case("runs-global-seed-beyond-meta-train", ["--seed", str(2**40), *_meta_train()], BAD_INPUT,
         f"the global --seed {2**40} is out of range for meta-train; allowed: 0 <= seed < 2**32"),
    Case("runs-global-seed-env-beyond-meta-train", _meta_train(), BAD_INPUT,
         f"the global --seed {2**40} (from MPBACKPROP_SEED) is out of range for meta-train",
         env={"MPBACKPROP_SEED": str(2**40)}),
    Case("runs-truncation-beyond-unroll", _meta_train("--unroll", "10", "--truncation", "50"), BAD_INPUT,
         "truncation must not exceed the longest unroll (got 50 > 10"),
    Case("runs-default-truncation-beyond-unroll", _meta_train("--unroll", "5,8"), BAD_INPUT,
         "use truncation <= 8"),
    # --- config values
    _config_case("eval-every-0", {"eval_every": 0}, "eval_every must be an integer >= 1 (got 0)"),
    _config_case("checkpoint-every-0", {"checkpoint_every": 0}, "checkpoint_every must be an integer >= 1"),
    _config_case("val-examples-0", {"val_examples": 0}, "val_examples must be an integer >= 1"),
    _config_case("eval-tasks-0", {"eval_tasks": 0}, "eval_tasks must be an integer >= 1"),
    _config_case("state-dim-0", {"state_dim": 0}, "state_dim must be an integer in 1..8"),
    _config_case("hidden-huge", {"hidden": 200000000}, "hidden must be an integer in 1..1024"),
    _config_case("eval-horizon-0", {"eval_horizon": 0}, "eval_horizon must be an integer >= 1"),
    _config_case("es-pairs-0", {"es_pairs": 0}, "es_pairs must be an integer >= 1"),
    _config_case("outer-steps-float", {"outer_steps": 2.7}, "outer_steps must be an integer >= 0 (got 2.7)"),
    _config_case("outer-steps-bool", {"outer_steps": True}, "outer_steps must be an integer >= 0 (got true)"),
    _config_case("clip-norm-0", {"clip_norm": 0}, "clip_norm must be a finite number > 0"),
    _config_case("clip-norm-negative", {"clip_norm": -1.0}, "clip_norm must be a finite number > 0"),
    _config_case("diverge-factor-0", {"diverge_factor": 0}, "diverge_factor must be a finite number > 1"),
    _config_case("meta-lr-infinity", {"meta_lr": float("inf")}, "meta_lr must be a finite number > 0 (got Infinity)"),
    _config_case("es-sigma-nan", {"es_sigma": float("nan")}, "es_sigma must be a finite number > 0 (got NaN)"),
    _config_case("final-weight-2", {"final_weight": 2}, "final_weight must be a number in [0, 1]"),
    _config_case("unroll-zero", {"unroll": [0, 5]}, "unroll must be a pair [lo, hi]"),
    _config_case("unroll-scalar", {"unroll": 5}, "unroll must be a pair [lo, hi]"),
    _config_case("weight-input-string", {"weight_input": "yes"}, "weight_input must be true or false"),
    _config_case("family-unknown", {"family": "mnist"}, "family must be one of digits-mlp"),
    _config_case("seed-string", {"seed": "1"}, "seed must be an integer in 0..4294967295"),
    _config_case("unknown-key", {"eval_evry": 3}, "unknown config keys: eval_evry"),
    Case("runs-config-not-an-object", _meta_train("--config", "{tmp}/cfg.json"), BAD_INPUT,
         "a config is a JSON object", files={"cfg.json": "[1, 2]"}),
    Case("runs-config-not-json", _meta_train("--config", "{tmp}/cfg.json"), BAD_INPUT,
         "not a valid meta-training config", files={"cfg.json": "{outer_steps: 3"}),
]
