"""Meta-training: reproducibility, exact resume, interruption, skipping non-finite steps, file safety."""

from __future__ import annotations

import json
import math
import os
import random
import signal

import pytest
import torch

from mpbackprop.errors import GraphFileError
from mpbackprop.metatrain import MetaConfig, MetaTrainer
from mpbackprop.metatrain.estimators import Estimate
from mpbackprop.metatrain.inner import step_weight
from mpbackprop.rules import load_rule
from mpbackprop.tasks import FAMILIES, SPLITS, Task, TaskSpec, load_dataset

TINY = dict(family="tabular-mlp", outer_steps=4, unroll=(6, 10), truncation=3, tasks_per_step=2, eval_every=2,
            eval_tasks=1, eval_horizon=5, checkpoint_every=1, val_examples=32, state_dim=2, hidden=4)


def _metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _strip(rows):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]


@pytest.mark.parametrize("estimator", ["tbptt", "es", "pes"])
def test_same_seed_same_metrics(tmp_path, estimator):
    cfg = MetaConfig(**TINY, estimator=estimator, es_pairs=2)
    MetaTrainer(cfg, tmp_path / "a").run(progress=False)
    MetaTrainer(cfg, tmp_path / "b").run(progress=False)
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert len(a) == cfg.outer_steps + 1
    assert _strip(a) == _strip(b)
    assert all(math.isfinite(r["meta_loss"]) for r in a[1:])
    c = MetaTrainer(cfg.replace(seed=1), tmp_path / "c")
    c.run(progress=False)
    assert _strip(_metrics(tmp_path / "c")) != _strip(a)


@pytest.mark.parametrize("estimator", ["tbptt", "pes"])
def test_resume_continues_exactly(tmp_path, estimator):
    cfg = MetaConfig(**TINY, estimator=estimator, es_pairs=2)
    MetaTrainer(cfg, tmp_path / "full").run(progress=False)
    MetaTrainer(cfg.replace(outer_steps=2), tmp_path / "split").run(progress=False)
    MetaTrainer(cfg, tmp_path / "split", resume=True).run(progress=False)
    assert _strip(_metrics(tmp_path / "split")) == _strip(_metrics(tmp_path / "full"))
    r1, _, _ = load_rule(tmp_path / "full" / "rule.pt")
    r2, _, _ = load_rule(tmp_path / "split" / "rule.pt")
    for a, b in zip(r1.state_dict().values(), r2.state_dict().values()):
        assert torch.equal(a, b)


def test_ctrl_c_saves_and_resume_finishes(tmp_path):
    cfg = MetaConfig(**{**TINY, "checkpoint_every": 100})

    def interrupt(row):
        if row["step"] == 2:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C: the run stops at the end of this step

    summary = MetaTrainer(cfg, tmp_path).run(progress=False, on_step=interrupt)
    assert summary.interrupted and summary.steps == 2
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["step"] == 2
    for name in ("config.json", "rule.pt", "best.pt", "metrics.jsonl", "meta_loss.png"):
        assert (tmp_path / name).is_file() and (tmp_path / name).stat().st_size > 0
    summary = MetaTrainer(cfg, tmp_path, resume=True).run(progress=False)
    assert summary.steps == cfg.outer_steps and not summary.interrupted


def test_non_finite_steps_are_skipped_and_counted(tmp_path, monkeypatch):
    cfg = MetaConfig(**TINY)
    trainer = MetaTrainer(cfg, tmp_path)
    real = trainer.estimator.estimate
    calls = {"n": 0}

    def flaky():
        calls["n"] += 1
        est = real()
        if calls["n"] == 2:
            return Estimate(est.grad * float("nan"), est.meta_loss)
        if calls["n"] == 3:
            return Estimate(est.grad, float("inf"))
        return est

    monkeypatch.setattr(trainer.estimator, "estimate", flaky)
    before = None
    rows = []

    def record(row):
        nonlocal before
        rows.append((row, [p.detach().clone() for p in trainer.params]))

    before = [p.detach().clone() for p in trainer.params]
    trainer.run(progress=False, on_step=record)
    assert [r["skipped"] for r, _ in rows] == [False, True, True, False]
    assert rows[-1][0]["skipped_total"] == 2
    # a skipped step leaves the meta-parameters as they were
    for a, b in zip(rows[0][1], rows[2][1]):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(before, rows[0][1]))
    assert all(torch.isfinite(p).all() for p in trainer.params)


def test_corrupt_or_foreign_state_is_refused(tmp_path):
    cfg = MetaConfig(**{**TINY, "outer_steps": 1})
    MetaTrainer(cfg, tmp_path).run(progress=False)
    (tmp_path / "state.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(GraphFileError):
        MetaTrainer(cfg, tmp_path, resume=True)
    torch.save({"format": "something-else"}, tmp_path / "state.pt")
    with pytest.raises(GraphFileError):
        MetaTrainer(cfg, tmp_path, resume=True)
    with pytest.raises(GraphFileError):
        MetaTrainer(cfg, tmp_path / "empty", resume=True)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(GraphFileError, match="config.json"):
        MetaTrainer(cfg, tmp_path, resume=True)


def test_objective_weights():
    for objective in ("mean", "final", "mixed"):
        total = sum(step_weight(t, 50, objective, 0.5) for t in range(50))
        assert total == pytest.approx(1.0)
    assert step_weight(49, 50, "final", 0.5) == 1.0 and step_weight(10, 50, "final", 0.5) == 0.0
    assert step_weight(49, 50, "mixed", 0.5) > 20 * step_weight(10, 50, "mixed", 0.5)


def test_config_validation_and_json_round_trip(tmp_path):
    cfg = MetaConfig(**TINY)
    assert MetaConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    with pytest.raises(ValueError, match="estimator"):
        MetaConfig(estimator="sgd")
    with pytest.raises(ValueError, match="unknown config keys"):
        MetaConfig.from_json({"famliy": "x"})


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_task_sets_are_disjoint_and_tasks_build(name):
    fam = FAMILIES[name]
    sets = {split: fam.tasks(split, 20, seed=0) for split in SPLITS}
    seeds = {split: {(t.init_seed, t.data_seed) for t in specs} for split, specs in sets.items()}
    assert not seeds["train"] & seeds["valid"] and not seeds["train"] & seeds["heldout"]
    assert not seeds["valid"] & seeds["heldout"]
    inits = {split: {t.init_seed for t in specs} for split, specs in sets.items()}
    assert not inits["train"] & inits["heldout"]
    assert fam.tasks("heldout", 5, seed=0) == sets["heldout"][:5]
    task = Task(sets["train"][0])
    x, y = task.batch(task.batch_generator())
    assert x.shape[0] == task.spec.batch_size
    loss, _ = task.evaluate(task.theta0)
    assert math.isfinite(float(loss))


def test_datasets_are_standardised_and_split_by_seed():
    tr, va = load_dataset("wine", 3)
    assert abs(float(tr.x.mean())) < 1e-5 and abs(float(tr.x.std()) - 1) < 0.05
    tr2, va2 = load_dataset("wine", 4)
    assert not torch.equal(va.x, va2.x)
    assert tr.x.shape[0] + va.x.shape[0] == 178
    rng = random.Random(0)
    assert FAMILIES["digits-mlp"].sample(rng, "train").dataset == "digits"


def test_augmented_tasks_rescale_inputs_and_initial_weights_and_keep_old_spec_json():
    from dataclasses import replace

    plain = FAMILIES["digits-mlp"].tasks("train", 1)[0]
    assert set(plain.to_json()) == {"dataset", "arch", "widths", "activation", "batch_size", "init_seed", "data_seed"}
    scaled = replace(plain, input_scale=2.0, init_scale=0.5)
    assert TaskSpec.from_json(scaled.to_json()) == scaled
    a, b = Task(plain), Task(scaled)
    assert torch.allclose(b.valid.x, 2 * a.valid.x) and torch.allclose(b.train.x, 2 * a.train.x)
    weights = [p for p in a.net.tensors if p.role == "weight"]
    for p in a.net.tensors:
        ratio = 0.5 if p in weights else 1.0
        assert torch.allclose(b.theta0[p.offset:p.stop], ratio * a.theta0[p.offset:p.stop])
    specs = FAMILIES["augmented"].tasks("train", 40)
    assert {s.arch for s in specs} == {"mlp", "conv"}
    assert len({s.dataset for s in specs}) >= 5
    assert all(0.5 <= s.input_scale <= 2 and 0.7 <= s.init_scale <= 1.4 for s in specs)


def test_depth_augmentation_adds_wider_and_deeper_mlps_and_leaves_the_augmented_family_alone():
    from mpbackprop.tasks.registry import _deepened

    class Draws:  # rng.random() returns these in turn
        def __init__(self, *values):
            self.values = list(values)

        def random(self):
            return self.values.pop(0)

    mlp, conv = TaskSpec(widths=(32, 16)), TaskSpec(dataset="digits-image", arch="conv", widths=(4, 8))
    assert _deepened(mlp, Draws(0.05, 0.9)).widths == (64, 32)  # wider (p = 0.1)
    assert _deepened(mlp, Draws(0.5, 0.2)).widths == (32, 16, 32, 16)  # deeper (p = 0.25)
    assert _deepened(mlp, Draws(0.05, 0.2)).widths == (64, 32, 64, 32)
    assert _deepened(mlp, Draws(0.5, 0.9)) == mlp
    assert _deepened(conv, Draws(0.05, 0.2)) == conv, "convnets keep their shape (8x8 inputs)"
    deep = FAMILIES["augmented-depth"].tasks("train", 200)
    assert any(s.arch == "mlp" and len(s.widths) > 2 for s in deep) and {s.arch for s in deep} == {"mlp", "conv"}
    assert all(len(s.widths) <= 2 for s in FAMILIES["augmented"].tasks("train", 200))
    Task(TaskSpec(widths=(32, 32, 32, 32)))  # a deepened task builds and compiles


def test_scalar_meta_parameters_get_their_own_learning_rate_only_when_asked():
    from mpbackprop.metatrain import build_rules
    from mpbackprop.metatrain.loop import meta_param_groups

    cfg = MetaConfig(family="digits-mlp")
    _, update = build_rules(cfg)
    params = list(update.parameters())
    (one,) = meta_param_groups(params, cfg)
    assert one["params"] == params and "lr" not in one
    fast = cfg.replace(scalar_lr_mult=10.0)
    groups = meta_param_groups(params, fast)
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(10 * fast.meta_lr)
    scalars = {id(p) for p in groups[1]["params"]}
    assert update.weight_decay  # the recipe's update learns its decay: λ is one of the scalars
    assert scalars == {id(update.log_lr_scale), id(update.horizon_raw), id(update.width_raw), id(update.floor_logit),
                       id(update.log_wd)}
    assert all(p.dim() > 0 for p in groups[0]["params"]) and len(groups[0]["params"]) + len(scalars) == len(params)
    with pytest.raises(ValueError, match="scalar_lr_mult"):
        MetaConfig(scalar_lr_mult=0.0)


def test_start_offsets_put_the_first_runs_out_of_phase():
    from mpbackprop.metatrain import build_rules
    from mpbackprop.metatrain.estimators import make_estimator

    cfg = MetaConfig(family="digits-mlp", unroll=(10, 40), truncation=2, tasks_per_step=3, es_pairs=1,
                     val_examples=32, start_offsets=True)
    rule, update = build_rules(cfg)
    est = make_estimator(cfg, FAMILIES["digits-mlp"], rule, update)
    est._ensure()
    steps = [s.step for s in est.inner]
    assert all(0 <= s.step < s.horizon for s in est.inner) and len(set(steps)) > 1, steps
    off = make_estimator(cfg.replace(start_offsets=False), FAMILIES["digits-mlp"], rule, update)
    off._ensure()
    assert [s.step for s in off.inner] == [0, 0, 0]


def test_lenet_family_has_batchnorm_and_maxpool_and_trains_as_autograd_does():
    from mpbackprop.engine import train_step
    from mpbackprop.rules import SGD, Exact

    spec = FAMILIES["digits-lenet"].tasks("train", 1)[0]
    task = Task(spec)
    assert {"conv2d", "batchnorm", "affine", "maxpool2d", "adaptive_avgpool2d"} <= {l.kind for l in task.net.layers}
    model = spec.build_model(10).train()  # the same initial parameters, batch statistics
    assert torch.equal(task.net.read_from(model), task.theta0)
    # SGD, not Adam: a conv bias before BatchNorm has a zero gradient up to rounding, which Adam would blow up
    opt_torch = torch.optim.SGD(model.parameters(), lr=0.1)
    theta, update, rule = task.theta0.clone(), SGD(0.1), Exact()
    opt, rs = update.init_state(theta), rule.init_state(task.net)
    gen = task.batch_generator(0)
    for k in range(10):
        x, y = task.batch(gen)
        r = train_step(task.net, theta, x, y, rule, update, rs, opt, k, loss=task.loss)
        theta, opt = r.theta, r.state
        opt_torch.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt_torch.step()
    assert torch.allclose(theta, task.net.read_from(model).detach(), rtol=1e-4, atol=1e-5)
    assert not torch.equal(theta, task.theta0)
