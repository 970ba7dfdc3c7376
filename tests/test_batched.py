"""The batched ES/PES copies (mpbackprop/metatrain/batched.py) against their reference: the same copies
unrolled one after another under perturbed meta-parameters."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from mpbackprop.metatrain import MetaConfig, MetaTrainer
from mpbackprop.metatrain import batched
from mpbackprop.metatrain.inner import _TASKS, get_task, new_inner, unroll
from mpbackprop.rules import Exact, FeedbackAlignment, LearnedUpdate, ScheduledUpdate
from mpbackprop.rules.base import UpdateContext
from mpbackprop.tasks import TaskSpec

MLP = TaskSpec("digits", "mlp", (16, 8), "tanh", 16, init_seed=11, data_seed=3)
CONV = TaskSpec("digits-image", "conv", (4,), "relu", 8, init_seed=12, data_seed=4)
REGRESSION = TaskSpec("teacher", "mlp", (8,), "gelu", 16, init_seed=13, data_seed=5)


@pytest.fixture(autouse=True)
def _restore_mode():
    yield
    batched.set_enabled(None)


def _update(kind: str) -> ScheduledUpdate:
    if kind == "default":
        update = ScheduledUpdate(horizon_exponent=True, horizon_init=0.6, lr=2e-2)
    elif kind == "weight-decay":
        update = ScheduledUpdate(weight_decay=True, hidden=3)
    else:
        update = ScheduledUpdate(correction=0.0)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a correction that is not zero
        for p in update.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return update


def _copies(spec: TaskSpec, update: ScheduledUpdate, k: int, sigma: float, dtype=torch.float32, seed: int = 0):
    params = list(update.parameters())
    state = new_inner(spec, update, 60, 64)
    if dtype != state.theta.dtype:
        state.theta = state.theta.to(dtype)
        state.opt_state = update.init_state(state.theta)
    with torch.no_grad():  # a few steps in, with momenta that are not zero
        unroll(Exact(), update, state, 3, "mixed", 0.8, 64, 5.0, False)
    gen = torch.Generator().manual_seed(seed)
    size = sum(p.numel() for p in params)
    deltas = [sigma * torch.randn(size, generator=gen, dtype=torch.float64) for _ in range(k)]
    return params, [state.copy() for _ in range(k)], deltas


def _run(update, params, states, deltas, on: bool, steps: int = 6, diverge: float = 5.0):
    batched.set_enabled(on)
    with torch.no_grad():
        return batched.unroll_copies(Exact(), update, params, states, deltas, steps, "mixed", 0.8, 64, diverge)


def _compare(spec, update, k=4, sigma=0.05, dtype=torch.float32, rtol=1e-6, steps=6, diverge=5.0):
    params, states, deltas = _copies(spec, update, k, sigma, dtype)
    ref_states = [s.copy() for s in states]
    with torch.no_grad():
        assert batched.supported(Exact(), update, states)
    ref = _run(update, params, ref_states, deltas, False, steps, diverge)
    out = _run(update, params, states, deltas, True, steps, diverge)
    for a, b, sa, sb in zip(ref, out, ref_states, states):
        assert (a.diverged, a.steps, a.weight) == (b.diverged, b.steps, b.weight)
        assert sa.step == sb.step and torch.equal(sa.gen.get_state(), sb.gen.get_state())
        for x, y in [(a.meta_loss, b.meta_loss), (sa.theta, sb.theta), *((sa.opt_state[n], sb.opt_state[n])
                                                                          for n in sa.opt_state)]:
            assert x.dtype == y.dtype and x.shape == y.shape
            err = float((x - y).abs().max() / x.abs().max().clamp_min(1e-30))
            assert err <= rtol, err
    return ref


@pytest.mark.parametrize("spec", [MLP, CONV, REGRESSION], ids=["mlp", "conv", "regression"])
@pytest.mark.parametrize("kind", ["default", "weight-decay", "no-correction"])
def test_batched_copies_equal_the_sequential_ones_float32(spec, kind):
    _compare(spec, _update(kind), steps=1, rtol=1e-6)  # one step: float32 rounding
    _compare(spec, _update(kind), steps=6, rtol=5e-6)  # and its slow accumulation


@pytest.fixture
def float64_task():
    """MLP's task with float64 data (the tasks hold float32; the engine runs in the parameters' dtype)."""
    spec = dataclasses.replace(MLP, init_seed=99)
    task = get_task(spec)
    task.train = dataclasses.replace(task.train, x=task.train.x.double())
    task.valid = dataclasses.replace(task.valid, x=task.valid.x.double())
    yield spec
    _TASKS.pop(spec, None)


@pytest.mark.parametrize("kind", ["default", "weight-decay"])
def test_batched_copies_equal_the_sequential_ones_float64(float64_task, kind):
    _compare(float64_task, _update(kind).double(), dtype=torch.float64, rtol=1e-12)


def test_diverging_copies_stop_where_they_would_alone():
    update = _update("default")
    params, states, deltas = _copies(MLP, update, 4, 0.0)
    lr = [i for i, (n, _) in enumerate(update.named_parameters()) if n == "log_lr_scale"][0]
    offset = sum(p.numel() for p in params[:lr])
    for k, boost in enumerate([0.0, 4.0, 0.0, 6.0]):  # copies 1 and 3 take huge steps
        deltas[k][offset] += boost
    ref_states = [s.copy() for s in states]
    ref = _run(update, params, ref_states, deltas, False, steps=8, diverge=1.5)
    out = _run(update, params, states, deltas, True, steps=8, diverge=1.5)
    assert [r.diverged for r in ref] == [r.diverged for r in out]
    assert any(r.diverged for r in ref) and not all(r.diverged for r in ref)
    assert [r.steps for r in ref] == [r.steps for r in out] and len({r.steps for r in ref}) > 1
    for sa, sb in zip(ref_states, states):
        assert sa.step == sb.step and torch.equal(sa.gen.get_state(), sb.gen.get_state())
        torch.testing.assert_close(sa.theta, sb.theta, rtol=1e-5, atol=1e-6, equal_nan=True)


@pytest.mark.parametrize("spec,wide_only", [(MLP, False), (CONV, False), (CONV, True)], ids=["mlp", "conv",
                                                                                       "conv-wide-only"])
def test_batched_scheduled_step_is_the_eager_step_per_copy(spec, wide_only):
    """The update alone, float64, against ScheduledUpdate.step with each copy's parameters loaded (the
    convnet has fan-ins below and above 64)."""
    update = _update("weight-decay").double()
    update.width_wide_only = wide_only
    params, states, deltas = _copies(spec, update, 3, 0.2)
    net = get_task(spec).net
    assert min(f for f in net.tensor_fan_in if f > 0) < 64 or spec is MLP
    gen = torch.Generator().manual_seed(2)
    p = net.num_params
    theta, g, v = (torch.randn(3, p, generator=gen, dtype=torch.float64) for _ in range(3))
    m, v = torch.randn(3, 2, p, generator=gen, dtype=torch.float64), v.square()
    mp = batched._copy_params(update, params, deltas)
    out = batched.scheduled_step(update, mp, theta, g, m, v, 17, 60, net.tensor_sizes, net.tensor_fan_in)
    segments = torch.repeat_interleave(torch.arange(len(net.tensor_sizes)), torch.tensor(net.tensor_sizes))
    for k in range(3):
        with batched.perturbed(params, deltas[k]), torch.no_grad():
            ctx = UpdateContext(theta[k], g[k].unsqueeze(1), {"m": m[k], "v": v[k]}, 17, segments,
                                len(net.tensor_sizes), net.tensor_sizes, 60, net.tensor_fan_in)
            ref_theta, ref_state = update.step(ctx)
        for a, b in [(ref_theta, out[0][k]), (ref_state["m"], out[1][k]), (ref_state["v"], out[2][k])]:
            assert float((a - b).abs().max() / a.abs().max()) <= 1e-12


def test_only_what_it_can_batch_is_batched():
    update = _update("default")
    params, states, deltas = _copies(MLP, update, 3, 0.01)
    with torch.no_grad():
        assert batched.supported(Exact(), update, states)
        assert not batched.supported(FeedbackAlignment(), update, states)  # not the exact backward
        assert not batched.supported(Exact(), LearnedUpdate(), states)
        assert not batched.supported(Exact(), update, states[:1])
        later = states[1].copy()
        unroll(Exact(), update, later, 1, "mixed", 0.8, 64, 5.0, False)
        assert not batched.supported(Exact(), update, [states[0], later])  # another step, another batch
        batched.set_enabled(False)
        assert not batched.supported(Exact(), update, states)
        batched.set_enabled(None)
    assert not batched.supported(Exact(), update, states)  # with autograd on


@pytest.mark.parametrize("estimator", ["es", "pes"])
def test_estimates_equal_the_sequential_ones(tmp_path, estimator):
    cfg = MetaConfig(estimator=estimator, family="augmented", tasks_per_step=3, truncation=5, es_pairs=2,
                     unroll=(20, 40), outer_steps=10, eval_every=10**6, checkpoint_every=10**6, val_examples=64)
    trainer = MetaTrainer(cfg, tmp_path)
    est = trainer.estimator
    est._ensure()
    for _ in range(3):
        saved = copy.deepcopy(est.state_dict())
        batched.set_enabled(False)
        ref = est.estimate()
        ref_state = copy.deepcopy(est.state_dict())
        est.load_state_dict(copy.deepcopy(saved))
        batched.set_enabled(True)
        out = est.estimate()
        assert (ref.resets, ref.finished) == (out.resets, out.finished)
        assert abs(ref.meta_loss - out.meta_loss) <= 1e-6 * abs(ref.meta_loss)
        # the ES coefficients (L⁺ − L⁻)/2σ² magnify float32 rounding of the losses by 1/σ
        assert float((ref.grad - out.grad).norm()) <= 2e-3 * float(ref.grad.norm())
        for row_a, row_b in zip(ref_state["inner"], est.state_dict()["inner"]):
            torch.testing.assert_close(row_a["theta"], row_b["theta"], rtol=1e-5, atol=1e-6)
