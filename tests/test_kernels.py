"""Fused kernels (mpbackprop/rules/kernels.py): each is the same function as the rule's eager code
(float32 within 1e-6 relative), and one chooser decides which runs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mpbackprop as mp
from mpbackprop.engine import train_step
from mpbackprop.rules import Exact, LearnedBackward, ScheduledUpdate, kernels, load_rule, rule_path
from mpbackprop.rules.base import UpdateContext

needs_compiler = pytest.mark.skipif(not kernels.available(), reason="torch.compile has no C++ compiler here")


@pytest.fixture(autouse=True)
def _mode_restored():
    yield
    kernels.set_mode(None)


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).to(dtype)
    net = mp.compile(model, (12,))
    return net, net.read_from(model).clone()


def _run(net, theta, rule, update, mode: str, steps: int = 6, dtype=torch.float32):
    """``steps`` training steps with fused mode ``mode``; the parameters and state after each."""
    kernels.set_mode(mode)
    gen = torch.Generator().manual_seed(3)
    state, rs, out = update.init_state(theta), rule.init_state(net), []
    for k in range(steps):
        x, y = torch.randn(8, 12, generator=gen, dtype=dtype), torch.randint(0, 3, (8,), generator=gen)
        r = train_step(net, theta, x, y, rule, update, rs, state, k, total_steps=10)
        theta, state = r.theta, r.state
        out.append((theta, state))
    return out


def _assert_close(ref, fused, rtol=1e-6):
    for (t1, s1), (t2, s2) in zip(ref, fused):
        for a, b in [(t1, t2), *((s1[k], s2[k]) for k in s1)]:
            err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))
            assert err <= rtol, err


def _perturbed(update: ScheduledUpdate) -> ScheduledUpdate:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in update.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return update


@needs_compiler
@pytest.mark.parametrize("make", [
    lambda: (Exact(), load_rule(rule_path("default"))[1]),
    lambda: (Exact(), _perturbed(ScheduledUpdate(weight_decay=True, horizon_exponent=True))),
    lambda: (Exact(), ScheduledUpdate(correction=0.0)),
    lambda: (LearnedBackward(state_dim=2), _perturbed(ScheduledUpdate(signal_dim=2))),
    lambda: (Exact(), _perturbed(ScheduledUpdate(weight_decay=True, width_init=0.5, width_wide_only=True))),
], ids=["default", "weight-decay", "no-correction", "two-channels", "wide-only"])
def test_compiled_scheduled_step_equals_the_eager_step(make):
    net, theta = _net()
    rule, update = make()
    before = len(kernels.compile_log())
    with torch.no_grad():
        ref = _run(net, theta, rule, update, "off")
        fused = _run(net, theta, rule, update, "on")
    assert any(e["kernel"] == "scheduled" for e in kernels.compile_log()) and kernels._cache, "the kernel never ran"
    assert len(kernels.compile_log()) - before <= 1  # at most one compilation per layout and variant
    _assert_close(ref, fused)


def _ctx(theta, signal, state, sizes, fan_in, total=10):
    seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return UpdateContext(theta, signal, state, 3, seg, len(sizes), sizes, total, fan_in)


@pytest.mark.parametrize("fan_in,wide_only", [((4, 0, 5, 0), False), (None, False), ((100, 0, 5, 0), True),
                                               ((100, 0, 5, 0), False)])
def test_eager_kernel_is_the_scheduled_step_in_float64(fan_in, wide_only):
    """The function that gets compiled, run eagerly, against ScheduledUpdate's own code."""
    update = _perturbed(ScheduledUpdate(weight_decay=True, width_wide_only=wide_only)).double()
    sizes = (20, 5, 25, 5)
    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(55, generator=gen, dtype=torch.float64)
    state = {"m": 0.1 * torch.randn(2, 55, generator=gen, dtype=torch.float64),
             "v": 0.01 * torch.rand(55, generator=gen, dtype=torch.float64)}
    signal = torch.randn(55, 1, generator=gen, dtype=torch.float64)
    ctx = _ctx(theta, signal, state, sizes, fan_in)
    with torch.no_grad():
        kernels.set_mode("off")
        ref_theta, ref_state = update.step(ctx)
        got = kernels.scheduled_step(*update._kernel_inputs(ctx, signal, sizes), sizes=sizes, decays=(0.9, 0.99),
                                     beta2=0.999, correction=True)
    assert torch.allclose(got[0], ref_theta, rtol=1e-13, atol=0)
    assert torch.allclose(got[1], ref_state["m"], rtol=1e-15, atol=0)
    assert torch.allclose(got[2], ref_state["v"], rtol=1e-15, atol=0)
    assert not torch.equal(got[0], theta)


def test_the_chooser():
    big = torch.zeros(700_000)
    small = torch.zeros(1000)
    kernels.set_mode("auto")
    with torch.no_grad():
        assert kernels.choose("scheduled", ((1000,), (0.9,), 0.999, True), 100, small) is None  # cannot pay
        assert kernels.choose("scheduled", ((1000,), (0.9,), 0.999, True), None, small) is None  # no length
        long_run = kernels.choose("scheduled", ((700_000,), (0.9,), 0.999, True), 10_000, big)
        assert (long_run is not None) == kernels.available()
        assert kernels.choose("scheduled", ((1000,), (0.9,), 0.999, True), 100, small, small.double()) is None
        kernels.set_mode("off")
        assert kernels.choose("scheduled", ((700_000,), (0.9,), 0.999, True), 10_000, big) is None
    kernels.set_mode("on")
    assert kernels.choose("scheduled", ((1000,), (0.9,), 0.999, True), 100, small) is None  # autograd on
    with pytest.raises(ValueError, match="fused mode"):
        kernels.set_mode("fast")


def test_env_sets_the_mode(monkeypatch):
    monkeypatch.setenv("MPBACKPROP_FUSED", "off")
    assert kernels.get_mode() == "off"
    kernels.set_mode("on")
    assert kernels.get_mode() == "on"
    kernels.set_mode(None)
    monkeypatch.setenv("MPBACKPROP_FUSED", "bogus")
    assert kernels.get_mode() == "auto"


def test_a_failing_compiler_falls_back_to_the_eager_step(monkeypatch):
    def broken(fn, **kwargs):
        def run(*args):
            raise RuntimeError("no compiler\nsecond line")
        return run

    monkeypatch.setattr(kernels, "available", lambda device="cpu": True)
    monkeypatch.setattr(kernels, "_cache", {})
    monkeypatch.setattr(kernels, "_broken", None)
    monkeypatch.setattr(torch, "compile", broken)
    net, theta = _net(torch.float64)
    update = _perturbed(ScheduledUpdate()).double()
    with torch.no_grad():
        ref = _run(net, theta, Exact(), update, "off", steps=2, dtype=torch.float64)
        with pytest.warns(RuntimeWarning, match="fused kernels are off for this process"):
            got = _run(net, theta, Exact(), update, "on", steps=2, dtype=torch.float64)
    assert kernels._broken == "RuntimeError: no compiler"
    for (t1, _), (t2, _) in zip(ref, got):
        assert torch.equal(t1, t2)  # float64, eager: exactly the reference
