"""README "A specialised optimizer for your problem", run as written on a small case.

The task file and the Python block run unchanged; the shell commands run through the CLI with their
sizes cut down (fewer outer steps, a short horizon, tiny meta-validation) so the test takes seconds.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mpbackprop.cli import main

ROOT = Path(__file__).resolve().parents[1]
SMALLER = {"--outer-steps": "2", "--unroll": "4,6", "--steps": "10", "--seeds": "2"}
EXTRA = {"meta-train": ["--truncation", "2", "--tasks-per-step", "1", "--no-progress", "--config", "tiny.json"],
         "evaluate": ["--tasks", "1", "--tuning-seeds", "1", "--no-progress", "--json"]}


def _section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### A specialised optimizer for your problem")
    return text[start:text.index("\n## ", start)]


def _commands(block: str) -> list[list[str]]:
    out = []
    for line in block.splitlines():
        argv = shlex.split(line, comments=True)
        if not argv or argv[0] != "mpbackprop":
            continue
        argv = argv[1:]
        for i, arg in enumerate(argv[:-1]):
            if arg in SMALLER:
                argv[i + 1] = SMALLER[arg]
        out.append(argv + EXTRA.get(argv[0], []))
    return out


def test_walkthrough(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    section = _section()
    task_file, usage = re.findall(r"```py\n(.*?)```", section, flags=re.S)
    (shell,) = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2))
    np.savez("my_data.npz", x=x, y=(np.linalg.norm(x, axis=1) > 1.2).astype(np.int64))
    Path("my_task.py").write_text(task_file)
    Path("tiny.json").write_text(json.dumps({"eval_every": 2, "eval_tasks": 1, "eval_horizon": 3, "val_examples": 16,
                                             "checkpoint_every": 1}))
    commands = _commands(shell)
    assert [c[0] for c in commands] == ["meta-train", "evaluate"]
    results = [CliRunner().invoke(main, argv, catch_exceptions=False) for argv in commands]
    assert [r.exit_code for r in results] == [0, 0], [r.output for r in results]
    report = json.loads(results[1].stdout)
    assert report["family"] == "my_task" and {"learned", "adam"} <= set(report["methods"])
    namespace: dict = {}
    exec(compile(usage, "README.md (walkthrough)", "exec"), namespace)  # noqa: S102 - our own documentation
    model, trainer = namespace["model"], namespace["trainer"]
    xs, ys = namespace["x"], namespace["y"]
    assert trainer.steps == 10 * len(namespace["loader"])
    accuracy = float((model(xs).argmax(1) == ys).float().mean())
    assert accuracy > 0.8, accuracy
    ckpt = torch.load("runs/my_task/ckpt.pt", weights_only=True)
    assert ckpt["trainer"]["steps"] == trainer.steps
