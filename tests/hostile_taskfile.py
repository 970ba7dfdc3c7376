"""Hostile input, area ``taskfile``: ``--task FILE.py`` of meta-train, evaluate and analyze."""

from __future__ import annotations

from pathlib import Path

from hostile import BAD_INPUT, Case

GOOD = '''
import numpy as np, torch.nn as nn
_rng = np.random.default_rng(0)
_x = _rng.normal(size=(80, 3))
DATASETS = {"d": (_x, (_x[:, 0] > 0).astype(int))}
MODELS = {"m": lambda shape, n: nn.Sequential(nn.Linear(shape[0], 6), nn.Tanh(), nn.Linear(6, n))}
BATCH_SIZES = (8,)
'''
TINY = ["--outer-steps", "1", "--unroll", "4,6", "--truncation", "2", "--tasks-per-step", "1", "--no-progress"]



def _meta(task: str) -> list[str]:
    return ["meta-train", "--task", task, "--out", "{tmp}/run", *TINY]


def _run_then(damage: str):
    """Setup: a tiny run of ``{tmp}/t.py`` in ``{tmp}/run``; then the task file is changed or moved."""
    def setup(tmp: Path) -> None:
        from mpbackprop.metatrain import MetaConfig, MetaTrainer

        (tmp / "t.py").write_text(GOOD)
        cfg = MetaConfig(task_file=str(tmp / "t.py"), outer_steps=1, unroll=(4, 6), truncation=2, tasks_per_step=1,
                         eval_every=1, eval_tasks=1, eval_horizon=3, val_examples=16)
        MetaTrainer(cfg, tmp / "run", notify=lambda _: None).run(progress=False)
        if damage == "changed":
            (tmp / "t.py").write_text(GOOD + "BATCH_SIZES = (4,)\n")
        else:
            (tmp / "t.py").rename(tmp / "elsewhere.py")
    return setup


CASES = [
    Case("task-missing", _meta("{tmp}/nope.py"), BAD_INPUT, "no such task file"),
    Case("task-not-python", _meta("{tmp}/t.txt"), BAD_INPUT, "not a Python file", files={"t.txt": GOOD}),
    Case("task-no-datasets", _meta("{tmp}/t.py"), BAD_INPUT, "define DATASETS",
         files={"t.py": "MODELS = {}\n"}),
    Case("task-syntax-error", _meta("{tmp}/t.py"), BAD_INPUT, "t.py:1: SyntaxError", files={"t.py": "DATASETS = {\n"}),
    Case("task-raises", _meta("{tmp}/t.py"), BAD_INPUT, "raised while running the task file",
         files={"t.py": "raise RuntimeError('boom')\n"}),
    Case("task-model-not-compilable", _meta("{tmp}/t.py"), BAD_INPUT, "MODELS['m'] on 'd'",
         files={"t.py": GOOD.replace("nn.Tanh()", "nn.Softmax(dim=1)")}),
    Case("task-model-not-a-module", _meta("{tmp}/t.py"), BAD_INPUT, "not a torch.nn.Module",
         files={"t.py": GOOD.replace("nn.Sequential(", "(")}),
    Case("task-builtin-name", _meta("{tmp}/t.py"), BAD_INPUT, "is a built-in task family",
         files={"t.py": GOOD + "NAME = 'digits-mlp'\n"}),
    Case("task-bad-batch-sizes", _meta("{tmp}/t.py"), BAD_INPUT, "BATCH_SIZES must be",
         files={"t.py": GOOD + "BATCH_SIZES = (0,)\n"}),
    Case("task-bad-scales", _meta("{tmp}/t.py"), BAD_INPUT, "SCALES must map",
         files={"t.py": GOOD + "SCALES = {'input': (2, 1)}\n"}),
    Case("task-bad-loss", _meta("{tmp}/t.py"), BAD_INPUT, "LOSS must be",
         files={"t.py": GOOD + "LOSS = 'hinge'\n"}),
    Case("task-negative-labels", _meta("{tmp}/t.py"), BAD_INPUT, "class ids",
         files={"t.py": GOOD.replace(".astype(int)", ".astype(int) - 1")}),
    Case("task-too-few-rows", _meta("{tmp}/t.py"), BAD_INPUT, "n >= 4",
         files={"t.py": GOOD.replace("size=(80, 3)", "size=(3, 3)")}),
    Case("task-loader-raises", _meta("{tmp}/t.py"), BAD_INPUT, "its loader raised ZeroDivisionError",
         files={"t.py": GOOD.replace('DATASETS = {"d": (', 'DATASETS = {"d": lambda: 1 / 0, "e": (')}),
    Case("task-missing-csv", _meta("{tmp}/t.py"), BAD_INPUT, "no such data file",
         files={"t.py": "from mpbackprop.taskfile import load_arrays\nDATASETS = {'d': load_arrays('x.csv')}\n"}),
    Case("task-csv-no-column", _meta("{tmp}/t.py"), BAD_INPUT, "no column 'y'",
         files={"t.py": "from mpbackprop.taskfile import load_arrays\nDATASETS = {'d': load_arrays('x.csv')}\n",
                "x.csv": "a,b\n1,2\n3,4\n"}),
    Case("task-evaluate-builtin-suite", ["evaluate", "default", "--task", "{tmp}/t.py", "--suite", "wider"], BAD_INPUT,
         "has the suites heldout and horizon", files={"t.py": GOOD}),
    Case("task-evaluate-family-disagrees", ["evaluate", "default", "--task", "{tmp}/t.py", "--family", "digits-mlp"],
         BAD_INPUT, "disagree", files={"t.py": GOOD}),
    Case("task-evaluate-changed", ["evaluate", "{tmp}/run", "--steps", "3"], BAD_INPUT, "changed since the run",
         setup=_run_then("changed")),
    Case("task-evaluate-moved", ["evaluate", "{tmp}/run", "--steps", "3"], BAD_INPUT,
         "no such task file (recorded by the run", setup=_run_then("moved")),
    Case("task-resume-changed", ["meta-train", "--out", "{tmp}/run", "--resume", "--no-progress"], BAD_INPUT,
         "changed since the run", setup=_run_then("changed")),
    Case("task-analyze-missing", ["analyze", "default", "--task", "{tmp}/nope.py"], BAD_INPUT, "no such task file"),
]
