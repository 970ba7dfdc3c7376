"""Task files: a user's own datasets and models meta-train, evaluate and train, from the CLI and Python."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import mpbackprop as mp
from mpbackprop import evaluation as ev
from mpbackprop.cli import main
from mpbackprop.metatrain import MetaConfig, MetaTrainer
from mpbackprop.tasks import FAMILIES, SPLITS, Task, TaskSpec, load_arrays, load_task_file

# Not among the examples: rings (npz, classification) and a sine regression (csv), two models,
# a custom loss for the regression, scaled inputs and initial weights.
TASK = '''
import numpy as np
import torch
import torch.nn as nn
from mpbackprop.taskfile import load_arrays

NAME = "rings-{tag}"


def _mlp(shape, n_out):
    return nn.Sequential(nn.Linear(shape[0], 12), nn.Tanh(), nn.Linear(12, n_out))


def _deep(shape, n_out):
    return nn.Sequential(nn.Linear(shape[0], 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, n_out))


DATASETS = {{"rings": load_arrays("rings.npz"), "noisy-rings": lambda: load_arrays("rings.npz")}}
MODELS = {{"mlp": _mlp, "deep": _deep}}
BATCH_SIZES = (8, 16)
SCALES = {{"input": (0.5, 2.0), "init": (0.8, 1.25)}}
'''
TINY = dict(outer_steps=2, unroll=(4, 6), truncation=2, tasks_per_step=1, eval_every=2, eval_tasks=1, eval_horizon=3,
            checkpoint_every=1, val_examples=16)


def _rings(folder: Path, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    r = rng.uniform(0, 2, 200)
    a = rng.uniform(0, 2 * np.pi, 200)
    x = np.stack([r * np.cos(a), r * np.sin(a)], 1) + rng.normal(scale=0.05, size=(200, 2))
    np.savez(folder / "rings.npz", x=x, y=(r > 1).astype(np.int64))


def _task_file(folder: Path, tag: str) -> Path:
    _rings(folder)
    path = folder / "my_task.py"
    path.write_text(TASK.format(tag=tag))
    return path


def test_python_meta_train_evaluate_and_trainer(tmp_path: Path) -> None:
    path = _task_file(tmp_path, "py")
    cfg = MetaConfig(task_file=str(path), **TINY)
    assert cfg.family == "rings-py" and cfg.task_file == str(path.resolve()) and len(cfg.task_sha256) == 64
    MetaTrainer(cfg, tmp_path / "run", notify=lambda _: None).run(progress=False)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["task_file"] == str(path.resolve()) and saved["task_sha256"] == cfg.task_sha256
    # evaluation against tuned baselines on the family's held-out tasks
    backward, update, _ = ev.resolve_rule(str(tmp_path / "run"))
    tasks = ev.suite_tasks("heldout", "rings-py", 1, 15)
    assert tasks[0][0].dataset.startswith("rings-py:")
    results = ev.evaluate(tasks, (backward, update), seeds=2, methods=("learned", "adam"), tuning_seeds=1)
    report = ev.summarize(results, ("learned", "adam"))
    assert set(report["methods"]) == {"learned", "adam"}
    assert results[0].lrs["adam"] > 0
    assert all(math.isfinite(c.loss[-1]) for c in results[0].curves["learned"])
    # the learned rule trains a model of the family with Trainer
    spec = FAMILIES["rings-py"].tasks("heldout", 1)[0]
    task = Task(spec)
    model = spec.build_model(task.num_outputs)
    trainer = mp.Trainer(model, rule=tmp_path / "run" / "best.pt", total_steps=200)
    before = float(torch.nn.functional.cross_entropy(model(task.valid.x), task.valid.y))
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        trainer.step(*task.batch(gen))
    after = float(torch.nn.functional.cross_entropy(model(task.valid.x), task.valid.y))
    assert after < 0.8 * before, (before, after)


def test_cli_meta_train_evaluate_analyze(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _task_file(tmp_path, "cli")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tiny.json").write_text(json.dumps({k: v for k, v in TINY.items() if k != "unroll"}))
    run = CliRunner().invoke(main, ["meta-train", "--task", "my_task.py", "--config", "tiny.json", "--unroll", "4,6",
                                    "--out", "run", "--no-progress"], catch_exceptions=False)
    assert run.exit_code == 0, run.output
    assert "meta-training rings-cli" in run.stderr
    out = CliRunner().invoke(main, ["evaluate", "run", "--steps", "10", "--seeds", "2", "--tasks", "1",
                                    "--tuning-seeds", "1", "--json", "--no-progress", "--out", "ev"],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    doc = json.loads(out.stdout)
    assert doc["family"] == "rings-cli"  # found through the run's config.json
    assert {"learned", "adam", "sgd"} <= set(doc["methods"])
    assert any(p.name.startswith("rings-cli-") for p in (tmp_path / "ev" / "tuning").iterdir())
    out = CliRunner().invoke(main, ["analyze", "fa", "--task", str(path), "--steps", "4", "--json"],
                             catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["steps"] == 4


def test_splits_are_disjoint_and_reproducible(tmp_path: Path) -> None:
    family = load_task_file(_task_file(tmp_path, "splits")).family
    seeds = {s: {(t.init_seed, t.data_seed) for t in family.tasks(s, 30)} for s in SPLITS}
    inits = {s: {i for i, _ in v} for s, v in seeds.items()}
    assert not (inits["train"] & inits["valid"]) and not (inits["train"] & inits["heldout"])
    assert family.tasks("train", 5, seed=3) == family.tasks("train", 5, seed=3)
    assert family.tasks("train", 5, seed=3) != family.tasks("train", 5, seed=4)
    specs = family.tasks("train", 40)
    assert {s.arch for s in specs} == {"rings-splits:mlp", "rings-splits:deep"}
    assert {s.batch_size for s in specs} == {8, 16}
    assert all(0.5 <= s.input_scale <= 2.0 and 0.8 <= s.init_scale <= 1.25 for s in specs)
    assert len({s.input_scale for s in specs}) > 30


def test_a_changed_file_is_loaded_again_and_refused_against_its_old_fingerprint(tmp_path: Path) -> None:
    path = _task_file(tmp_path, "change")
    first = load_task_file(path)
    assert load_task_file(path, first.sha256) is first  # unchanged: not run again
    x0 = Task(first.family.tasks("train", 1)[0]).train.x
    _rings(tmp_path, seed=1)  # the data file changes, the task file does not
    second = load_task_file(path)
    assert second.sha256 != first.sha256
    assert not torch.equal(Task(second.family.tasks("train", 1)[0]).train.x, x0)  # the new data is used
    with pytest.raises(mp.errors.TaskFileError, match="changed since the run"):
        load_task_file(path, first.sha256)


def test_custom_loss_and_regression_csv(tmp_path: Path) -> None:
    x = np.linspace(-2, 2, 50)
    rows = "\n".join(f"{a:.5f},{math.sin(a):.5f}" for a in x)
    (tmp_path / "sine.csv").write_text("x,target\n" + rows + "\n")
    (tmp_path / "sine.py").write_text(
        "import torch, torch.nn as nn\nfrom mpbackprop.taskfile import load_arrays\n"
        "DATASETS = {'sine': load_arrays('sine.csv', y='target')}\n"
        "MODELS = {'m': lambda s, n: nn.Sequential(nn.Linear(s[0], 8), nn.Tanh(), nn.Linear(8, n))}\n"
        "def LOSS(out, y):\n    return (out - y).abs().mean()\n")
    family = load_task_file(tmp_path / "sine.py").family
    spec = family.tasks("heldout", 1)[0]
    task = Task(spec)
    assert task.train.kind == "regression" and task.num_outputs == 1 and callable(spec.loss)
    theta = task.theta0
    out = task.net(task.valid.x, theta)
    assert torch.allclose(task.evaluate(theta)[0], (out - task.valid.y).abs().mean())


def test_load_arrays_npz_and_csv(tmp_path: Path) -> None:
    np.savez(tmp_path / "a.npz", x=np.arange(12.0).reshape(4, 3), y=np.array([0, 1, 1, 0]))
    x, y = load_arrays(tmp_path / "a.npz")
    assert x.shape == (4, 3) and y.tolist() == [0, 1, 1, 0]
    (tmp_path / "b.csv").write_text("f1,label,f2\n1,0,2\n3,1,4\n")
    x, y = load_arrays(tmp_path / "b.csv", y="label")
    assert x.tolist() == [[1, 2], [3, 4]] and y.tolist() == [0, 1] and y.dtype == np.int64


def test_builtin_specs_and_configs_read_as_before() -> None:
    spec = TaskSpec("digits", "mlp", (32,), "relu", 32, 0, 0)
    assert spec.name == "digits/mlp-32-relu/b32/s0"
    assert "task_file" not in MetaConfig().to_json() and "task_sha256" not in MetaConfig().dumps()
    assert MetaConfig.from_json(MetaConfig().to_json()) == MetaConfig()
