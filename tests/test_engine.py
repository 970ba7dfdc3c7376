"""The message-passing engine against autograd, and the rules' contracts."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mpbackprop as mp
from mpbackprop import verify
from mpbackprop.engine import signals, train_step
from mpbackprop.errors import GraphFileError
from mpbackprop.rules import (
    SGD, Adam, BackwardRule, Exact, FeedbackAlignment, LearnedBackward, LearnedUpdate, load_rule, save_rule,
)

ACTS = [nn.ReLU(), nn.LeakyReLU(0.1), nn.ELU(0.7), nn.GELU(), nn.GELU("tanh"), nn.SiLU(), nn.Tanh(), nn.Sigmoid(),
        nn.Softplus(beta=2.0), nn.Identity()]


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(4, 4, 3, padding="same", dilation=2, bias=False)
        self.pool = nn.AvgPool2d(2)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        h = F.gelu(self.c1(x))
        h = h + 0.5 * torch.relu(self.c2(h))
        h = self.pool(h)
        return self.fc(torch.flatten(h, 1))


class ResMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.f1 = nn.Linear(8, 8)
        self.f2 = nn.Linear(8, 8)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = h + F.silu(self.f1(h))
        h = h - 0.25 * self.f2(h)
        return self.out(F.elu(h))


class StridedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 0))
        self.p = nn.AvgPool2d(2, stride=1, padding=1, count_include_pad=False)
        self.fc = nn.Linear(3 * 5 * 8, 2)

    def forward(self, x):
        return self.fc(self.p(torch.sigmoid(self.c(x))).flatten(1))


MODELS = {f"mlp-{type(a).__name__.lower()}-{i}": (lambda a=a: nn.Sequential(nn.Linear(5, 7), copy.deepcopy(a),
                                                                             nn.Linear(7, 4)), (5,))
          for i, a in enumerate(ACTS)}
MODELS.update({
    "deep-mlp": (lambda: nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3)), (4,)),
    "convnet": (ConvNet, (1, 8, 8)),
    "resmlp": (ResMLP, (6,)),
    "strided-conv": (StridedConv, (2, 7, 8)),
})


def _reference(model: nn.Module, x, y, loss_fn) -> torch.Tensor:
    params = list(model.parameters())
    grads = torch.autograd.grad(loss_fn(model(x), y), params)
    return torch.cat([g.reshape(-1) for g in grads])


def _batch(net, dtype, loss, batch=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *net.input_shape, generator=gen, dtype=dtype)
    if loss == "cross_entropy":
        y = torch.randint(0, net.layers[net.output_layer].size, (batch,), generator=gen)
    else:
        y = torch.randn(batch, *net.output_shape, generator=gen, dtype=dtype)
    return x, y


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_rule_equals_autograd(name, dtype, loss):
    torch.manual_seed(1)
    factory, shape = MODELS[name]
    model = factory().to(dtype)
    net = mp.compile(model, shape)
    x, y = _batch(net, dtype, loss)
    got, _ = signals(net, x, y, Exact(), loss)
    ref = _reference(model, x, y, mp.engine.LOSSES[loss])
    assert got.shape == (net.num_params, 1)
    if dtype == torch.float64:
        assert (got[:, 0] - ref).abs().max() <= 1e-10
    else:
        assert (got[:, 0] - ref).abs().max() / ref.abs().max() <= 1e-4


@st.composite
def _stacks(draw):
    depth = draw(st.integers(1, 4))
    widths = [draw(st.integers(1, 9)) for _ in range(depth + 1)]
    layers: list[nn.Module] = []
    for k in range(depth):
        layers.append(nn.Linear(widths[k], widths[k + 1], bias=draw(st.booleans())))
        if k < depth - 1:
            layers.append(copy.deepcopy(draw(st.sampled_from(ACTS))))
    return nn.Sequential(*layers), widths[0], draw(st.integers(1, 5)), draw(st.integers(0, 10_000))


@settings(max_examples=30, deadline=None)
@given(_stacks())
def test_exact_rule_random_stacks(case):
    model, n_in, batch, seed = case
    torch.manual_seed(seed)
    for p in model.parameters():
        nn.init.normal_(p)
    model = model.double()
    net = mp.compile(model, (n_in,))
    x, y = _batch(net, torch.float64, "mse", batch, seed)
    got, _ = signals(net, x, y, Exact(), "mse")
    ref = _reference(model, x, y, F.mse_loss)
    assert (got[:, 0] - ref).abs().max() <= 1e-10 * max(1.0, float(ref.abs().max()))


@pytest.mark.parametrize("name", ["convnet", "resmlp", "deep-mlp"])
def test_feedback_alignment_matches_straight_through_oracle(name):
    factory, shape = MODELS[name]
    report = verify(factory(), shape, rule="fa", dtype=torch.float64)
    assert report.ok and report.max_abs_err <= 1e-10
    exact = verify(factory(), shape, rule="exact", dtype=torch.float64)
    assert exact.ok


def test_feedback_alignment_differs_from_backprop_and_is_seeded():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    net = mp.compile(model, (5,))
    x, y = _batch(net, torch.float64, "cross_entropy")
    fa0, _ = signals(net, x, y, FeedbackAlignment(seed=0))
    fa0b, _ = signals(net, x, y, FeedbackAlignment(seed=0))
    fa1, _ = signals(net, x, y, FeedbackAlignment(seed=1))
    ex, _ = signals(net, x, y, Exact())
    first = net.layers[1].weight
    sl = slice(first.offset, first.stop)
    assert torch.equal(fa0, fa0b)
    assert not torch.allclose(fa0[sl], fa1[sl])
    assert not torch.allclose(fa0[sl], ex[sl])
    last = net.layers[2]  # the last layer's signal does not depend on feedback weights
    sl_last = slice(last.weight.offset, last.bias.stop)
    assert torch.allclose(fa0[sl_last], ex[sl_last], atol=1e-12)


class _ExactUDF(Exact):
    """Exact backprop through the engine's UDF path (edge message + node reduce UDFs)."""

    def coefficients(self, ctx):
        return None


@pytest.mark.parametrize("name", ["convnet", "deep-mlp", "strided-conv"])
def test_udf_path_equals_builtin_path(name):
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory().double()
    net = mp.compile(model, shape)
    x, y = _batch(net, torch.float64, "cross_entropy")
    a, _ = signals(net, x, y, Exact())
    b, _ = signals(net, x, y, _ExactUDF())
    assert (a - b).abs().max() <= 1e-12


class _Channels(BackwardRule):
    """Three channels carrying the same exact signal through full d×d coefficient matrices."""

    state_dim = 3

    def seed(self, dloss_da, ctx=None):
        return dloss_da.unsqueeze(1).expand(-1, 3, -1).contiguous()

    def coefficients(self, ctx):
        eye = torch.eye(3, dtype=ctx.weight.dtype)
        mix = torch.tensor([[0.0, 1, 0], [0, 0, 1], [1, 0, 0]], dtype=ctx.weight.dtype)  # channel rotation
        return ctx.weight.view(-1, 1, 1) * (0.5 * eye + 0.5 * mix)


def test_full_matrix_coefficients_broadcast_over_channels():
    torch.manual_seed(0)
    factory, shape = MODELS["convnet"]
    model = factory().double()
    net = mp.compile(model, shape)
    x, y = _batch(net, torch.float64, "cross_entropy")
    got, _ = signals(net, x, y, _Channels())
    ref = _reference(model, x, y, F.cross_entropy)
    assert got.shape == (net.num_params, 3)
    for c in range(3):
        assert (got[:, c] - ref).abs().max() <= 1e-10


def test_learned_rule_at_backprop_takes_the_exact_first_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    net = mp.compile(model, (6,))
    x, y = _batch(net, torch.float64, "cross_entropy", batch=9)
    theta = net.values.clone()
    ref = train_step(net, theta, x, y, Exact(), Adam(1e-2), {}, Adam(1e-2).init_state(theta), 0)
    for d in (1, 3):
        rule = LearnedBackward(state_dim=d, init="backprop").double()
        upd = Adam(1e-2)
        got = train_step(net, theta, x, y, rule, upd, rule.init_state(net), upd.init_state(theta), 0)
        assert (got.theta - ref.theta).abs().max() <= 1e-12
    # the learned update started at Adam equals Adam over several steps
    rule, lupd, adam = Exact(), LearnedUpdate(signal_dim=1, init="adam", lr=1e-2).double(), Adam(1e-2)
    t1, s1 = theta, lupd.init_state(theta)
    t2, s2 = theta, adam.init_state(theta)
    for step in range(3):
        r1 = train_step(net, t1, x, y, rule, lupd, {}, s1, step)
        r2 = train_step(net, t2, x, y, rule, adam, {}, s2, step)
        t1, s1, t2, s2 = r1.theta, r1.state, r2.theta, r2.state
    assert (t1 - t2).abs().max() <= 1e-10


def test_learned_from_feedback_starts_as_feedback_alignment():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    net = mp.compile(model, (6,))
    x, y = _batch(net, torch.float64, "cross_entropy")
    rule = LearnedBackward(state_dim=1, init="feedback", seed=4).double()
    got, _ = signals(net, x, y, rule)
    ref, _ = signals(net, x, y, FeedbackAlignment(seed=4))
    assert (got - ref).abs().max() <= 1e-12


class _Unroll(nn.Module):
    def __init__(self, rule, update, net, x, y):
        super().__init__()
        self.rule, self.update, self.net, self.x, self.y = rule, update, net, x, y

    def forward(self):
        theta = self.net.values.clone()
        state = self.update.init_state(theta)
        rs = self.rule.init_state(self.net)
        for step in range(2):
            r = train_step(self.net, theta, self.x, self.y, self.rule, self.update, rs, state, step,
                           differentiable=True)
            theta, state = r.theta, r.state
        return F.cross_entropy(self.net(self.x, theta), self.y)


def test_unrolled_steps_are_differentiable_in_the_meta_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    net = mp.compile(model, (3,))
    x, y = _batch(net, torch.float64, "cross_entropy", batch=4)
    rule = LearnedBackward(state_dim=2, hidden=4, init="backprop").double()
    update = LearnedUpdate(signal_dim=2, hidden=4, init="adam", lr=0.05).double()
    for p in list(rule.parameters()) + list(update.parameters()):  # leave the zero start: non-trivial gradients
        with torch.no_grad():
            p.add_(0.3 * torch.randn_like(p))
    unroll = _Unroll(rule, update, net, x, y)
    names = [n for n, _ in unroll.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for _, p in unroll.named_parameters()]).requires_grad_(True)
    shapes = [p.shape for _, p in unroll.named_parameters()]

    def f(vec):
        params, k = {}, 0
        for n, s in zip(names, shapes):
            num = int(torch.tensor(s).prod()) if len(s) else 1
            params[n] = vec[k:k + num].view(s)
            k += num
        return torch.func.functional_call(unroll, params, ())

    assert torch.autograd.gradcheck(f, (flat,), eps=1e-6, atol=1e-5, rtol=1e-4)
    (g,) = torch.autograd.grad(f(flat), flat)
    assert g.abs().sum() > 0


def test_trace_writes_what_flowed_on_the_graph():
    torch.manual_seed(0)
    factory, shape = MODELS["convnet"]
    model = factory().double()
    net = mp.compile(model, shape)
    x, y = _batch(net, torch.float64, "cross_entropy", batch=3)
    theta = net.values.clone()
    before = set(net.graph.nodes["neuron"].data.keys())
    train_step(net, theta, x, y, Exact(), SGD(0.1), {}, {}, 0)
    assert set(net.graph.nodes["neuron"].data.keys()) == before  # nothing leaks without trace
    r = train_step(net, theta, x, y, Exact(), SGD(0.1), {}, {}, 0, trace=True)
    nd, pd = net.graph.nodes["neuron"].data, net.graph.nodes["param"].data
    assert nd["b"].shape == (net.num_neurons, 3, 1)
    assert pd["signal"].shape == (net.num_params, 1)
    ref = _reference(model, x, y, F.cross_entropy)
    assert (pd["signal"][:, 0] - ref).abs().max() <= 1e-10
    assert torch.allclose(pd["delta"], 0.1 * ref, atol=1e-12)
    out = net.layers[net.output_layer]
    logits = model(x)
    seed = (torch.softmax(logits, 1) - F.one_hot(y, 5)).t()  # per-sample dℓ/dz at the output
    assert torch.allclose(nd["b"][out.offset:out.stop, :, 0], seed, atol=1e-12)
    assert torch.isfinite(r.loss)


def test_trainer_matches_torch_optim_sgd():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4)).double()
    twin = copy.deepcopy(model)
    trainer = mp.Trainer(model, rule="exact", update=SGD(0.2, momentum=0.9))
    opt = torch.optim.SGD(twin.parameters(), lr=0.2, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        x = torch.randn(8, 5, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 4, (8,), generator=gen)
        loss = trainer.step(x, y)
        opt.zero_grad()
        ref = F.cross_entropy(twin(x), y)
        ref.backward()
        opt.step()
        assert loss == pytest.approx(float(ref), abs=1e-12)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.allclose(p, q, atol=1e-12)
    loss = trainer.step(lambda out, t: F.mse_loss(out, F.one_hot(t, 4).double()), x, y)
    assert loss > 0


def test_rule_files_round_trip_and_refuse_junk(tmp_path):
    rule = LearnedBackward(state_dim=2, hidden=5, init="feedback", seed=3)
    update = LearnedUpdate(signal_dim=2, hidden=5, init="scratch")
    with torch.no_grad():
        rule.alpha.fill_(0.7)
        update.net[-1].weight.normal_()
    path = save_rule(tmp_path / "r.pt", rule, update, {"note": "test"})
    r2, u2, meta = load_rule(path)
    assert meta == {"note": "test"}
    assert r2.config() == rule.config() and u2.config() == update.config()
    for a, b in zip(list(rule.state_dict().values()) + list(update.state_dict().values()),
                    list(r2.state_dict().values()) + list(u2.state_dict().values())):
        assert torch.equal(a, b)
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage")
    with pytest.raises(GraphFileError):
        load_rule(tmp_path / "junk.pt")
    torch.save({"something": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(GraphFileError):
        load_rule(tmp_path / "foreign.pt")
    with pytest.raises(GraphFileError):
        load_rule(tmp_path / "missing.pt")


@pytest.mark.parametrize("rule_factory", [Exact, lambda: FeedbackAlignment(seed=2), _Channels,
                                          lambda: LearnedBackward(state_dim=3, init="feedback").double(),
                                          lambda: LearnedBackward(state_dim=1, init="feedback").double()])
@pytest.mark.parametrize("name", ["deep-mlp", "resmlp", "convnet"])
def test_fused_dense_path_equals_dgl_path(name, rule_factory):
    torch.manual_seed(0)
    factory, shape = MODELS[name]
    model = factory().double()
    net = mp.compile(model, shape)
    x, y = _batch(net, torch.float64, "cross_entropy")
    rule = rule_factory()
    for p in rule.parameters():  # non-trivial learned coefficients
        with torch.no_grad():
            p.add_(0.1 * torch.randn_like(p))
    state = rule.init_state(net)
    fused, _ = signals(net, x, y, rule, rule_state=state, fused=True)
    plain, _ = signals(net, x, y, rule, rule_state=state, fused=False)
    assert fused.abs().max() > 0
    assert (fused - plain).abs().max() <= 1e-12 * max(1.0, float(plain.abs().max()))


def test_packaged_default_rule_loads_and_trains():
    from mpbackprop.rules import DEFAULT_RULE
    from mpbackprop.tasks import FAMILIES

    _, _, meta = load_rule(DEFAULT_RULE)
    assert meta["config"]["family"] in FAMILIES and "command" in meta and "commit" in meta
    train, valid = mp.tasks.load_dataset("digits", 0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    before = F.cross_entropy(model(valid.x), valid.y).item()
    trainer = mp.Trainer(model, rule="default", total_steps=100)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, len(train.x), (32,), generator=gen)
        trainer.step(train.x[idx], train.y[idx])
    after = F.cross_entropy(model(valid.x), valid.y).item()
    assert after < 0.5 * before, (before, after)
