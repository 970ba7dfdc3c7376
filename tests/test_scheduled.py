"""The scheduled learned update: starts as Adam on a cosine schedule, never grows its step past the
stated length, scales with fan-in, is differentiable, and saves/loads like every rule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import mpbackprop as mp
from mpbackprop.engine import train_step
from mpbackprop.rules import Adam, Exact, LearnedBackward, ScheduledUpdate, load_rule, save_rule
from mpbackprop.rules.base import UpdateContext
from mpbackprop.rules.scheduled import cosine_schedule


def _net(dtype=torch.float64, hidden=16):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, 3)).to(dtype)
    net = mp.compile(model, (8,))
    return net, net.read_from(model).clone()


def _batch(seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(6, 8, generator=gen, dtype=dtype), torch.randint(0, 3, (6,), generator=gen)


def _perturb(module: nn.Module, scale: float = 0.5) -> None:
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


class _CosineAdam(Adam):
    """Reference: Adam whose learning rate follows ``cosine_schedule(t/T, floor)``."""

    def __init__(self, lr: float, total: int, floor: float) -> None:
        super().__init__(lr)
        self.total, self.floor, self.peak = total, floor, lr

    def step(self, ctx):
        self.lr = self.peak * cosine_schedule(ctx.step / self.total, self.floor)
        return super().step(ctx)


def test_starts_as_adam_on_a_cosine_schedule():
    net, theta0 = _net()
    total = 30
    upd, ref = ScheduledUpdate(lr=1e-2, floor=0.1).double(), _CosineAdam(1e-2, total, 0.1)
    t1, s1, t2, s2 = theta0, upd.init_state(theta0), theta0, ref.init_state(theta0)
    for step in range(total + 5):  # past the stated length too
        x, y = _batch(step)
        r1 = train_step(net, t1, x, y, Exact(), upd, {}, s1, step, total_steps=total)
        r2 = train_step(net, t2, x, y, Exact(), ref, {}, s2, step, total_steps=total)
        (t1, s1), (t2, s2) = (r1.theta, r1.state), (r2.theta, r2.state)
    assert torch.allclose(t1, t2, rtol=0, atol=1e-8), float((t1 - t2).abs().max())  # ~1e-10: rounding


def test_step_size_follows_progress_and_stays_at_the_floor_past_the_end():
    upd = ScheduledUpdate(lr=1e-2, floor=0.2, horizon_exponent=True).double()
    with torch.no_grad():
        upd.horizon_raw.fill_(math.atanh(0.5))
    total = 400
    sizes = [float(upd.step_size(t, total)) for t in (0, 100, 200, 399, 400, 4000, 40_000)]
    peak = 1e-2 * (total / 100) ** -0.5
    assert sizes[0] == pytest.approx(peak)
    assert sizes[2] == pytest.approx(peak * (0.2 + 0.8 * 0.5))
    assert all(a >= b for a, b in zip(sizes, sizes[1:]))  # never grows
    assert sizes[4] == sizes[5] == sizes[6] == pytest.approx(0.2 * peak)  # past T: the floor


def test_needs_the_runs_length():
    net, theta = _net()
    x, y = _batch(0)
    upd = ScheduledUpdate().double()
    with pytest.raises(ValueError, match="total_steps"):
        train_step(net, theta, x, y, Exact(), upd, {}, upd.init_state(theta), 0)


def test_width_exponent_scales_weights_by_fan_in_and_not_biases():
    net, theta = _net(hidden=128)
    fan_in = net.tensor_fan_in
    assert fan_in == (8, 0, 128, 0)
    x, y = _batch(0)
    base, scaled = ScheduledUpdate(correction=0.0).double(), ScheduledUpdate(correction=0.0).double()
    with torch.no_grad():
        scaled.width_raw.fill_(math.atanh(1.0 - 1e-12))  # p = 1: μP's exponent
    d0 = theta - train_step(net, theta, x, y, Exact(), base, {}, base.init_state(theta), 0, total_steps=10).theta
    d1 = theta - train_step(net, theta, x, y, Exact(), scaled, {}, scaled.init_state(theta), 0, total_steps=10).theta
    for p, f in zip(net.tensors, fan_in):
        ratio = d1[p.offset:p.stop] / d0[p.offset:p.stop]
        expected = 64 / f if f else 1.0
        ok = d0[p.offset:p.stop].abs() > 1e-12
        assert torch.allclose(ratio[ok], torch.full_like(ratio[ok], expected), rtol=1e-6), p.path


def test_correction_is_bounded_and_decay_touches_weights_only():
    net, theta = _net()
    x, y = _batch(0)
    upd = ScheduledUpdate(correction=0.25, weight_decay=True).double()
    _perturb(upd.net, scale=20.0)  # a wild correction MLP
    adam = ScheduledUpdate(correction=0.0).double()
    r = train_step(net, theta, x, y, Exact(), upd, {}, upd.init_state(theta), 0, total_steps=50)
    ra = train_step(net, theta, x, y, Exact(), adam, {}, adam.init_state(theta), 0, total_steps=50)
    eta = float(upd.step_size(0, 50))
    extra = (ra.theta - r.theta) / eta  # correction + decay, in units of the step size
    wd = math.exp(float(upd.log_wd))
    for p in net.tensors:
        part = extra[p.offset:p.stop]
        decay = wd * theta[p.offset:p.stop] if p.role == "weight" else 0 * part
        assert float((part - decay).abs().max()) <= 0.25 + 1e-9
    assert float((extra - torch.cat([wd * theta[p.offset:p.stop] if p.role == "weight" else
                                     torch.zeros(p.numel, dtype=theta.dtype) for p in net.tensors])).abs().max()) > 0.05


def test_unroll_is_differentiable_in_every_meta_parameter():
    net, theta0 = _net()
    upd = ScheduledUpdate(weight_decay=True, horizon_exponent=True).double()
    _perturb(upd.net, scale=0.3)
    rule = LearnedBackward().double()
    params = [p for p in upd.parameters()]

    def loss_of(*values):
        with torch.no_grad():
            for p, v in zip(params, values):
                p.copy_(v)
        theta, state = theta0, upd.init_state(theta0)
        for step in range(3):
            x, y = _batch(step)
            r = train_step(net, theta, x, y, rule, upd, rule.init_state(net), state, step, differentiable=True,
                           total_steps=5)
            theta, state = r.theta, r.state
        x, y = _batch(99)
        return torch.nn.functional.cross_entropy(net(x, theta), y)

    loss = loss_of(*[p.detach().clone() for p in params])
    grads = torch.autograd.grad(loss, params)
    assert all(torch.isfinite(g).all() for g in grads)
    nonzero = {name for (name, _), g in zip(upd.named_parameters(), grads) if float(g.abs().max()) > 0}
    assert {"log_lr_scale", "horizon_raw", "floor_logit", "log_wd", "width_raw"} <= nonzero, nonzero
    # finite differences on the learning-rate scale
    eps = 1e-6
    base = [p.detach().clone() for p in params]
    up = [b.clone() for b in base]
    up[0] += eps
    down = [b.clone() for b in base]
    down[0] -= eps
    fd = (float(loss_of(*up)) - float(loss_of(*down))) / (2 * eps)
    assert float(grads[0]) == pytest.approx(float(fd), rel=1e-4, abs=1e-9)


def test_horizon_exponent_is_a_fixed_zero_unless_learned():
    fixed, learned = ScheduledUpdate(), ScheduledUpdate(horizon_exponent=True)
    assert "horizon_raw" not in dict(fixed.named_parameters()) and "horizon_raw" in dict(learned.named_parameters())
    assert float(fixed.step_size(0, 2500)) == pytest.approx(float(fixed.step_size(0, 100)))
    assert set(fixed.state_dict()) == set(learned.state_dict())  # files of either kind load alike


def test_saves_and_loads(tmp_path):
    upd = ScheduledUpdate(hidden=3, correction=0.3, weight_decay=True)
    _perturb(upd)
    save_rule(tmp_path / "r.pt", LearnedBackward(), upd, {"note": "x"})
    _, loaded, meta = load_rule(tmp_path / "r.pt")
    assert isinstance(loaded, ScheduledUpdate) and meta["note"] == "x"
    assert loaded.config() == upd.config()
    for (k, a), (_, b) in zip(upd.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k


def test_trainer_passes_total_steps():
    net, _ = _net(torch.float32)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    trainer = mp.Trainer(model, rule="exact", update=ScheduledUpdate(), total_steps=20)
    x, y = _batch(0, torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.step(x, y)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    with pytest.raises(ValueError, match="total_steps"):
        mp.Trainer(model, rule="exact", update=ScheduledUpdate()).step(x, y)


def test_the_correction_is_odd_in_the_gradient():
    net, theta = _net()
    x, y = _batch(0)
    upd = ScheduledUpdate(correction=0.5).double()
    _perturb(upd.net, scale=2.0)  # biases included: an unconstrained MLP would drift
    state = upd.init_state(theta)
    signal = torch.randn(theta.numel(), 1, dtype=torch.float64)
    def delta(sig):
        ctx = UpdateContext(theta, sig, state, 0, torch.repeat_interleave(
            torch.arange(len(net.tensors)), torch.tensor(net.tensor_sizes)), len(net.tensors), net.tensor_sizes, 50,
            net.tensor_fan_in)
        return theta - upd.step(ctx)[0]

    assert torch.allclose(delta(signal), -delta(-signal), atol=1e-15)
    assert float(delta(torch.zeros_like(signal)).abs().max()) == 0.0


def test_weight_decay_starts_where_asked_and_old_rule_files_keep_their_start(tmp_path):
    import json

    from mpbackprop.metatrain.config import MetaConfig
    from mpbackprop.metatrain.loop import MetaTrainer

    upd = ScheduledUpdate(weight_decay=True, weight_decay_init=0.1)
    assert abs(math.exp(float(upd.log_wd)) - 0.1) < 1e-6
    assert abs(math.exp(float(ScheduledUpdate(weight_decay=True).log_wd)) - 1e-4) < 1e-9  # the old start
    with pytest.raises(ValueError, match="weight_decay_init"):
        ScheduledUpdate(weight_decay=True, weight_decay_init=0.0)
    save_rule(tmp_path / "r.pt", Exact(), upd)
    assert abs(math.exp(float(load_rule(tmp_path / "r.pt")[1].log_wd)) - 0.1) < 1e-6
    # a rule file written before the option: its config has no weight_decay_init
    cfg = upd.config()
    del cfg["weight_decay_init"]
    assert ScheduledUpdate(**cfg).weight_decay_init == 1e-4
    # the meta-training config carries it to the run's update; old config JSON reads as 1e-4
    run_cfg = MetaConfig(weight_decay=True, weight_decay_init=0.1, outer_steps=1)
    assert MetaConfig.from_json(json.loads(run_cfg.dumps())).weight_decay_init == 0.1
    old = MetaConfig().to_json()
    del old["weight_decay_init"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert MetaConfig.load_run(tmp_path / "old.json").weight_decay_init == 1e-4  # a run's own config
    assert MetaConfig.load_run(tmp_path / "old.json").weight_decay  # as written
    assert MetaConfig.from_json(old).weight_decay_init == 0.1  # a user's config file: the recipe's start
    with pytest.raises(ValueError, match="weight_decay_init"):
        MetaConfig(weight_decay_init=-1.0)
    trainer = MetaTrainer(run_cfg, tmp_path / "run")
    assert abs(math.exp(float(trainer.update.log_wd)) - 0.1) < 1e-6


def test_width_exponent_starts_where_asked_and_scales_wide_layers_steps(tmp_path):
    import json

    from mpbackprop.metatrain.config import MetaConfig
    from mpbackprop.metatrain.loop import MetaTrainer

    upd = ScheduledUpdate(width_init=0.5)
    assert abs(float(upd.width_exponent()) - 0.5) < 1e-6
    assert float(ScheduledUpdate().width_exponent()) == 0.0  # the old start
    with pytest.raises(ValueError, match="width_init"):
        ScheduledUpdate(width_init=1.0)

    def first_step(width_init, inputs=64, wide_only=False):  # how far one step moves each tensor
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(inputs, 256), nn.ReLU(), nn.Linear(256, 3))
        before = [p.detach().clone() for p in model.parameters()]
        update = ScheduledUpdate(width_init=width_init, width_wide_only=wide_only)
        trainer = mp.Trainer(model, rule="exact", update=update, total_steps=20)
        g = torch.Generator().manual_seed(1)
        trainer.step(torch.randn(32, inputs, generator=g), torch.randint(0, 3, (32,), generator=g))
        return [(p.detach() - b).abs().sum() for p, b in zip(model.parameters(), before)]

    flat, scaled = first_step(0.0), first_step(0.5)
    ratios = [float(s / f) for s, f in zip(scaled, flat)]
    # weights with fan-in 64 keep their step, the 256-fan-in layer's halves, (256/64)^-0.5; biases keep theirs
    assert ratios == pytest.approx([1.0, 1.0, 0.5, 1.0], rel=1e-4)
    # fan-in 16: p = 0.5 doubles the step, (16/64)^-0.5, unless only wider layers are scaled
    ratios = [float(s / f) for s, f in zip(first_step(0.5, 16), first_step(0.0, 16))]
    assert ratios == pytest.approx([2.0, 1.0, 0.5, 1.0], rel=1e-4)
    ratios = [float(s / f) for s, f in zip(first_step(0.5, 16, True), first_step(0.0, 16))]
    assert ratios == pytest.approx([1.0, 1.0, 0.5, 1.0], rel=1e-4)
    assert ScheduledUpdate(width_wide_only=True).config()["width_wide_only"] is True

    save_rule(tmp_path / "r.pt", Exact(), upd)
    assert abs(float(load_rule(tmp_path / "r.pt")[1].width_exponent()) - 0.5) < 1e-6
    cfg = upd.config()
    del cfg["width_init"]  # a rule file written before the option
    assert ScheduledUpdate(**cfg).width_init == 0.0
    run_cfg = MetaConfig(width_init=0.5, outer_steps=1)
    assert MetaConfig.from_json(json.loads(run_cfg.dumps())).width_init == 0.5
    old = run_cfg.to_json()
    del old["width_init"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert MetaConfig.load_run(tmp_path / "old.json").width_init == 0.0  # a run's own config: its start
    del old["width_wide_only"]
    (tmp_path / "old.json").write_text(json.dumps(old))
    assert MetaConfig.load_run(tmp_path / "old.json").width_wide_only is False
    with pytest.raises(ValueError, match="width_init"):
        MetaConfig(width_init=-1.0)
    assert abs(float(MetaTrainer(run_cfg, tmp_path / "run").update.width_exponent()) - 0.5) < 1e-6
