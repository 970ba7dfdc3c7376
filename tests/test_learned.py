"""The learned rules' fast paths compute the same functions as their plain, differentiable forms."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import mpbackprop as mp
from mpbackprop.engine import train_step
from mpbackprop.rules import LearnedBackward, LearnedUpdate, load_rule, save_rule
from mpbackprop.rules import learned as L
from mpbackprop.rules.base import LayerContext, UpdateContext

from hostile_output import edited_rule_file


def _perturb(*modules: nn.Module, scale: float = 0.5, seed: int = 0) -> None:
    """Move every meta-parameter off its (partly zero) start so that every term is exercised."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


def _naive_mlp(seq, x, const, columns, row_scale, sizes, out_scale):
    """The definition of ``_feature_mlp``: scale rows, normalise per run, append constants, run ``seq``."""
    x = x * row_scale.unsqueeze(1) if row_scale is not None else x
    if sizes is not None:
        parts = [p / torch.sqrt(p.pow(2).mean(1, keepdim=True) + L._EPS) for p in x.split(list(sizes), 1)]
        x = torch.cat(parts, 1)
    n_in = seq[0].in_features
    full = x.new_zeros(x.shape[1], n_in)
    var, fixed = columns if columns is not None else (list(range(x.shape[0])), list(range(x.shape[0], n_in)))
    full[:, var] = x.t()
    if const is not None:
        full[:, fixed] = const
    out = seq(full).t()
    return out * out_scale.unsqueeze(1) if out_scale is not None else out


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("chunk", [7, 1 << 18])
@pytest.mark.parametrize("case", ["plain", "sizes", "columns"])
def test_feature_mlp_is_the_naive_mlp(monkeypatch, case, chunk, grad):
    monkeypatch.setattr(L, "_CHUNK", chunk)
    torch.manual_seed(0)
    seq = L.mlp(6, 5, 3, layers=2, zero_last=False).double()
    x = torch.randn(4, 40, dtype=torch.float64)
    const = torch.randn(2, dtype=torch.float64)
    kw = {"row_scale": torch.rand(4, dtype=torch.float64) + 0.5, "out_scale": torch.randn(3, dtype=torch.float64),
          "sizes": None, "columns": None}
    if case == "sizes":
        kw["sizes"] = (10, 3, 27)
    if case == "columns":
        kw["columns"] = ([0, 2, 3, 5], [1, 4])
    ref = _naive_mlp(seq, x, const, **kw)
    with torch.set_grad_enabled(grad):
        got = L._feature_mlp(seq, x, const, **kw)
    assert got.shape == ref.shape == (3, 40)
    assert (got - ref).abs().max() <= 1e-12 * float(ref.abs().max())


def test_fast_tanh_is_tanh():
    x = torch.linspace(-20, 20, 2001, dtype=torch.float64)
    assert (L._tanh(x) - torch.tanh(x)).abs().max() <= 1e-15
    assert (L._tanh(x.float()) - torch.tanh(x.float())).abs().max() <= 3e-7


def _update_ctx(sizes, dtype, signal_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    theta = torch.randn(n, generator=gen, dtype=dtype)
    signal = torch.randn(n, signal_dim, generator=gen, dtype=dtype) * torch.logspace(-6, 0, n, dtype=dtype).unsqueeze(1)
    segments = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return theta, signal, segments


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("signal_dim", [1, 2])
@pytest.mark.parametrize("init,weight_input", [("adam", False), ("scratch", False), ("adam", True)])
def test_no_grad_update_is_the_differentiable_update(dtype, tol, signal_dim, init, weight_input):
    """Without autograd the compact update takes its fused path; it must be the same function."""
    upd = LearnedUpdate(signal_dim=signal_dim, hidden=6, init=init, weight_input=weight_input).to(dtype)
    _perturb(upd)
    sizes = (30, 7, 50)
    theta, _, segments = _update_ctx(sizes, dtype, signal_dim, 1)
    states = {"fast": upd.init_state(theta), "plain": upd.init_state(theta)}
    thetas = {"fast": theta, "plain": theta}
    for step in range(4):
        _, signal, _ = _update_ctx(sizes, dtype, signal_dim, 10 + step)
        for key, grad in (("fast", False), ("plain", True)):
            ctx = UpdateContext(thetas[key], signal, states[key], step, segments, len(sizes), sizes)
            with torch.set_grad_enabled(grad):
                thetas[key], states[key] = upd.step(ctx)
        moved = float((thetas["plain"] - theta).abs().max())
        assert moved > 0
        assert float((thetas["fast"] - thetas["plain"]).abs().max()) <= tol * max(moved, 1.0)
        for k in states["plain"]:
            assert torch.allclose(states["fast"][k], states["plain"][k], rtol=tol, atol=0)


def test_no_grad_coefficients_are_the_differentiable_coefficients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 9), nn.ReLU(), nn.Linear(9, 4)).double()
    net = mp.compile(model, (6,))
    rule = LearnedBackward(state_dim=1, hidden=5, init="feedback").double()
    _perturb(rule)
    layer = net.layers[2]
    w = net.values[layer.weight.offset:layer.weight.stop]
    ctx = LayerContext(layer, w, rule.init_state(net), 1.0, {})
    with torch.no_grad():
        fast = rule.coefficients(ctx)
    with torch.enable_grad():
        plain = rule.coefficients(ctx)
    assert (fast - plain).abs().max() <= 1e-13 and fast.abs().max() > 0
    assert not torch.equal(fast, rule.alpha.detach() * w)  # the learned part is in it


@pytest.mark.parametrize("features", ["compact", "full"])
def test_learned_update_at_adam_start_is_adam_for_both_feature_sets(features):
    torch.manual_seed(0)
    sizes = (12, 5)
    theta, _, segments = _update_ctx(sizes, torch.float64, 1, 0)
    upd = LearnedUpdate(signal_dim=1, init="adam", lr=1e-2, features=features, layers=2).double()
    adam = mp.rules.Adam(1e-2)
    s1, s2, t1, t2 = upd.init_state(theta), adam.init_state(theta), theta, theta
    for step in range(3):
        _, signal, _ = _update_ctx(sizes, torch.float64, 1, 5 + step)
        with torch.no_grad():
            t1, s1 = upd.step(UpdateContext(t1, signal, s1, step, segments, 2, sizes))
            t2, s2 = adam.step(UpdateContext(t2, signal, s2, step, segments, 2, sizes))
    assert (t1 - theta).abs().max() > 1e-4
    assert (t1 - t2).abs().max() <= 1e-12


def test_full_feature_sets_keep_the_original_architecture():
    """Rules saved before the ``features`` option are ``full``: their MLP shapes must not change."""
    b = LearnedBackward(state_dim=2, hidden=16, features="full")
    u = LearnedUpdate(signal_dim=2, hidden=16, layers=2, features="full")
    assert b.coef_mlp[0].in_features == 5 and b.node_mlp[0].in_features == 6
    assert u.net[0].in_features == 2 + 2 * 4 + 2 + 4 and u.net[-1].out_features == 2
    assert sum(isinstance(m, nn.Linear) for m in u.net) == 3
    c = LearnedBackward(state_dim=2)
    assert c.coef_mlp[0].in_features == 4 and c.node_mlp[0].in_features == 5
    assert LearnedUpdate(signal_dim=2).net[0].in_features == 2 + 2 + 4
    assert LearnedUpdate(signal_dim=2, weight_input=True).net[0].in_features == 2 + 2 + 1 + 4


def test_rule_files_from_before_the_feature_option_load_as_full(tmp_path):
    b = LearnedBackward(state_dim=2, hidden=6, features="full")
    u = LearnedUpdate(signal_dim=2, hidden=6, layers=2, features="full")
    _perturb(b, u)
    path = save_rule(tmp_path / "r.pt", b, u)
    blob = torch.load(path, weights_only=True)
    for part, drop in (("backward", ("features",)), ("update", ("features", "layers"))):
        cfg = json.loads(blob[part]["config"])
        for key in drop:
            del cfg[key]
        blob[part]["config"] = json.dumps(cfg)
    torch.save(blob, tmp_path / "old.pt")
    b2, u2, _ = load_rule(tmp_path / "old.pt")
    assert b2.features == "full" and u2.features == "full" and u2.layers == 2
    for x, y in zip(list(b.state_dict().values()) + list(u.state_dict().values()),
                    list(b2.state_dict().values()) + list(u2.state_dict().values())):
        assert torch.equal(x, y)


@pytest.mark.parametrize("features", ["compact", "full"])
def test_both_feature_sets_train_a_network(features):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    net = mp.compile(model, (5,))
    rule = LearnedBackward(state_dim=2, features=features)
    upd = LearnedUpdate(signal_dim=2, features=features, lr=0.05)
    x, y = torch.randn(32, 5), torch.randint(0, 3, (32,))
    theta, state, rs = net.values.clone(), upd.init_state(net.values), rule.init_state(net)
    losses = []
    for step in range(30):
        r = train_step(net, theta, x, y, rule, upd, rs, state, step)
        theta, state = r.theta, r.state
        losses.append(float(r.loss))
    assert losses[-1] < 0.7 * losses[0]


# ------------------------------------------------------------------ bounds on load
def _edited_rule_file(tmp_path, part="update", config=None, state=None):
    return edited_rule_file(tmp_path / "r.pt", part, config, state)


@pytest.mark.parametrize("part,key,value,allowed", [
    ("update", "hidden", 2e8, "1..1024"),            # the 6 KB file that allocated > 5 GB
    ("update", "hidden", 200_000_000, "1..1024"),
    ("update", "hidden", 0, "1..1024"),
    ("update", "layers", -1, "1..16"),
    ("update", "layers", 3.5, "1..16"),
    ("update", "signal_dim", 65, "1..8"),
    ("backward", "state_dim", 64, "1..8"),
    ("backward", "hidden", True, "1..1024"),
    ("backward", "seed", 2**64, "0..9223372036854775807"),
    ("update", "lr", float("nan"), "finite"),
    ("update", "max_step", float("inf"), "finite"),
])
def test_rule_config_out_of_bounds_is_refused_before_anything_is_built(tmp_path, monkeypatch, part, key, value,
                                                                        allowed):
    path = _edited_rule_file(tmp_path, part, {key: value})

    def must_not_build(**kwargs):
        raise AssertionError(f"built a rule from {kwargs}")

    from mpbackprop.rules import io

    monkeypatch.setitem(io.BACKWARD_RULES, "learned", must_not_build)
    monkeypatch.setitem(io.UPDATE_RULES, "learned", must_not_build)
    with pytest.raises(mp.errors.GraphFileError) as err:
        load_rule(path)
    message = str(err.value)
    assert "\n" not in message
    assert str(path) in message and key in message and repr(value) in message and allowed in message, message


def test_rule_constructors_enforce_the_same_size_limits():
    for key, (lo, hi) in L.SIZE_LIMITS.items():
        cls = LearnedBackward if key == "state_dim" else LearnedUpdate
        cls(**{key: hi})  # the limits themselves are allowed
        for bad in (lo - 1, hi + 1, float(lo)):
            with pytest.raises(ValueError, match=key):
                cls(**{key: bad})


def test_state_that_does_not_fit_the_config_is_named_on_one_line(tmp_path):
    wide = LearnedBackward(hidden=8).state_dict()  # the config (hidden 4) needs width 4
    path = _edited_rule_file(tmp_path, "backward", state=wide)
    with pytest.raises(mp.errors.GraphFileError) as err:
        load_rule(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message
    assert "coef_mlp.0.weight has shape [8, 4], the config needs [4, 4]" in message, message
    assert message.endswith("and 2 more)"), message  # six mismatches: four shown, the count of the rest

    state = LearnedUpdate().state_dict()
    state["extra"] = torch.zeros(2)
    del state["log_lr_scale"]
    state["net.0.bias"] = torch.full_like(state["net.0.bias"], float("nan"))
    with pytest.raises(mp.errors.GraphFileError) as err:
        load_rule(_edited_rule_file(tmp_path, "update", state=state))
    message = str(err.value)
    assert "missing log_lr_scale" in message and "unexpected extra" in message, message
    assert "net.0.bias holds values that are not finite" in message, message
