"""Distributed meta-training: 2 local workers on gloo (loopback) == 1 process with both workers' tasks."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from mpbackprop.rules import load_rule

TINY = {"family": "tabular-mlp", "outer_steps": 4, "unroll": [6, 10], "truncation": 3, "tasks_per_step": 1,
        "eval_every": 2, "eval_tasks": 1, "eval_horizon": 4, "checkpoint_every": 1, "val_examples": 32,
        "state_dim": 2, "hidden": 4, "es_pairs": 2}


def _config(tmp_path, **changes):
    path = tmp_path / f"cfg-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps({**TINY, **changes}))
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc, *args, env=None):
    # loopback only: a static rendezvous on 127.0.0.1 (not "localhost", which may resolve to ::1 for one
    # side and 127.0.0.1 for the other) and gloo pinned to the loopback interface
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", str(nproc),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "mpbackprop", "meta-train", *map(str, args), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
                               "MPBACKPROP_DIST_TIMEOUT": "120", **(env or {})})


def _single(*args):
    cmd = [sys.executable, "-m", "mpbackprop", "meta-train", *map(str, args), "--no-progress"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _params(run_dir):
    backward, update, _ = load_rule(run_dir / "rule.pt")
    return list(backward.state_dict().values()) + list(update.state_dict().values())


def _metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.parametrize("estimator", ["tbptt", "es", "pes"])
def test_two_workers_equal_one_process_with_both_task_slots(tmp_path, estimator):
    res = _torchrun(2, "--config", _config(tmp_path, estimator=estimator), "--out", tmp_path / "two")
    assert res.returncode == 0, res.stderr[-2000:]
    res = _single("--config", _config(tmp_path, estimator=estimator, tasks_per_step=2), "--out", tmp_path / "one")
    assert res.returncode == 0, res.stderr[-2000:]
    for a, b in zip(_params(tmp_path / "two"), _params(tmp_path / "one")):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
    two, one = _metrics(tmp_path / "two"), _metrics(tmp_path / "one")
    assert [r["step"] for r in two] == list(range(TINY["outer_steps"] + 1))
    for r2, r1 in zip(two[1:], one[1:]):
        assert r2["meta_loss"] == pytest.approx(r1["meta_loss"], rel=1e-5)
    assert not (tmp_path / "two" / "state-rank1.pt").exists()  # rank 0 alone writes


def test_a_dead_worker_stops_the_run_and_resume_finishes_it(tmp_path):
    cfg = _config(tmp_path)
    res = _torchrun(2, "--config", cfg, "--out", tmp_path / "clean")
    assert res.returncode == 0, res.stderr[-2000:]
    res = _torchrun(2, "--config", cfg, "--out", tmp_path / "killed", env={"MPBACKPROP_FAULT_AT_STEP": "3"})
    assert res.returncode != 0
    assert "a worker of the distributed run stopped" in res.stderr and "last checkpoint: step 2" in res.stderr
    assert torch.load(tmp_path / "killed" / "state.pt", weights_only=True)["step"] == 2
    res = _torchrun(2, "--config", cfg, "--out", tmp_path / "killed", "--resume")
    assert res.returncode == 0, res.stderr[-2000:]
    assert _metrics(tmp_path / "killed") == _metrics(tmp_path / "clean")
    for a, b in zip(_params(tmp_path / "killed"), _params(tmp_path / "clean")):
        assert torch.equal(a, b)
    res = _single("--config", cfg, "--out", tmp_path / "killed", "--resume")  # other worker count: refused
    assert res.returncode == 2 and "same number" in res.stderr
