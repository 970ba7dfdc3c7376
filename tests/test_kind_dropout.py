"""Dropout: identity edges carrying the sample's mask; the identity without a generator (eval), the
module's own mask with one (tests/kindcheck.py, and against autograd with masks drawn alike); training
(``train_step``/``InnerStep``/``Trainer``) draws seeded masks, as ``torch.optim`` training does."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpbackprop as mp
from mpbackprop.engine import backward, train_step
from mpbackprop.errors import UnsupportedOpError
from mpbackprop.rules import SGD, Adam, Exact
from kindcheck import check_kind, seq


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.b(F.dropout(torch.tanh(self.a(x)), 0.3))


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.drop = nn.Linear(4, 6), nn.Linear(6, 3), nn.Dropout(0.3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return self.b(h + self.drop(h))


CASES = {
    "mlp": (seq(nn.Linear(5, 6), nn.ReLU(), nn.Dropout(0.4), nn.Linear(6, 3)), (5,)),
    "residual": (_Residual, (4,)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dropout_without_mask_is_exact(name, tmp_path) -> None:
    make, shape = CASES[name]
    errors = check_kind(make, shape, "dropout", tmp_path)
    assert errors["float64"] <= 1e-10 and errors["float32"] <= 1e-4


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("fused", [True, False])
def test_dropout_with_mask_matches_the_module_in_training(name, fused) -> None:
    make, shape = CASES[name]
    torch.manual_seed(0)
    model = make().double().train()
    net = mp.compile(model, shape)
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    torch.manual_seed(7)
    params = list(model.parameters())
    want = torch.autograd.grad(F.cross_entropy(model(x), y), params)
    want = torch.cat([g.reshape(-1) for g in want])
    record = net.forward(x, record=True, generator=torch.Generator().manual_seed(7))
    assert record.aux and (record.aux[next(iter(record.aux))] == 0).any()
    a_out = record.a[net.output_layer].detach().requires_grad_(True)
    (dl,) = torch.autograd.grad(F.cross_entropy(a_out, y), a_out)
    got = backward(net, record, dl * 6, Exact(), {}, net.values, fused=fused).signal[:, 0]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_inplace_and_functional_dropout_are_refused() -> None:
    with pytest.raises(UnsupportedOpError, match="inplace"):
        mp.compile(nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5, inplace=True), nn.Linear(2, 2)), (2,))
    with pytest.raises(UnsupportedOpError, match="dropout"):
        mp.compile(_Functional(), (4,))


# ---------------------------------------------------------------------------------------- training with masks
def _dropout_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Dropout(0.3), nn.Linear(8, 8), nn.ReLU(), nn.Dropout(0.3),
                         nn.Linear(8, 3)).double()


def _plain_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _train_batches(n: int = 6) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(7, 5, generator=gen, dtype=torch.float64), torch.randint(0, 3, (7,), generator=gen))
            for _ in range(n)]


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))


def test_trainer_with_dropout_matches_torch_optim_in_training_mode() -> None:
    """Exact rule + SGD through ``Trainer(seed=s)`` equals module.train() + torch.optim.SGD after
    ``torch.manual_seed(s)``: both draw the same masks (bernoulli_(1−p) on the input's shape), the
    engine's backward uses them."""
    batches = _train_batches(5)
    ours, ref = _dropout_mlp(), _dropout_mlp()
    trainer = mp.Trainer(ours, rule="exact", update=SGD(lr=0.1), seed=11)
    for x, y in batches:
        trainer.step(x, y)
    torch.manual_seed(11)  # only dropout draws from the global RNG below
    ref.train()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    assert _max_diff(ours, ref) <= 1e-10  # measured ~6e-17
    # and the masks mattered: the same loop without dropout (eval mode) ends elsewhere
    plain = _dropout_mlp().eval()
    opt = torch.optim.SGD(plain.parameters(), lr=0.1)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(plain(x), y).backward()
        opt.step()
    assert _max_diff(ours, plain) > 1e-3


def test_same_seed_same_run_different_seed_different_run() -> None:
    batches = _train_batches()
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        model = _dropout_mlp()
        trainer = mp.Trainer(model, rule="fa", update=Adam(lr=1e-2), seed=seed)
        for x, y in batches:
            trainer.step(x, y)
        runs[name] = model
    assert all(torch.equal(p, q) for p, q in zip(runs["a"].parameters(), runs["b"].parameters()))
    assert _max_diff(runs["a"], runs["c"]) > 1e-6


def test_seed_none_draws_the_seed_from_the_global_rng() -> None:
    """``seed=None``: one draw from the global RNG at the first step (reproducible under torch.manual_seed)."""
    batches = _train_batches(3)
    models = []
    for global_seed in (5, 5, 6):
        model = _dropout_mlp()
        torch.manual_seed(global_seed)
        trainer = mp.Trainer(model, rule="exact", update=SGD(lr=0.1))
        for x, y in batches:
            trainer.step(x, y)
        assert trainer.generator is not None
        models.append(model)
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))
    assert _max_diff(models[0], models[2]) > 1e-6


def test_evaluation_after_training_draws_no_mask() -> None:
    model = _dropout_mlp()
    trainer = mp.Trainer(model, rule="exact", update=SGD(lr=0.1), seed=0)
    for x, y in _train_batches(2):
        trainer.step(x, y)
    assert trainer.net is not None
    state = trainer.generator.get_state()
    x = _train_batches(1)[0][0]
    out = trainer.net(x, trainer.theta)
    torch.testing.assert_close(out, model.eval()(x), rtol=0, atol=1e-12)
    assert torch.equal(trainer.net(x, trainer.theta), out) and torch.equal(trainer.generator.get_state(), state)


def test_inner_step_passes_its_generator_to_every_step() -> None:
    net = mp.compile(_dropout_mlp(), (5,))
    batches = _train_batches(3)
    run = mp.InnerStep.start(net, net.values.clone(), Exact(), SGD(lr=0.1), generator=torch.Generator().manual_seed(2))
    for x, y in batches:
        run.step(x, y)
    gen, theta, state = torch.Generator().manual_seed(2), net.values.clone(), {}
    for t, (x, y) in enumerate(batches):
        result = train_step(net, theta, x, y, Exact(), SGD(lr=0.1), {}, state, t, generator=gen, keep_backward=True)
        theta, state = result.theta, result.state
    assert torch.equal(run.theta, theta)
    no_masks = mp.InnerStep.start(net, net.values.clone(), Exact(), SGD(lr=0.1))
    for x, y in batches:
        no_masks.step(x, y)
    assert not torch.equal(no_masks.theta, theta)


def test_without_dropout_the_generator_changes_nothing() -> None:
    """A network without Dropout: bit-identical steps with and without a generator, which is never touched."""
    net = mp.compile(_plain_mlp(), (5,))
    gen = torch.Generator().manual_seed(0)
    before = gen.get_state()
    results = []
    update = SGD(lr=0.1, momentum=0.9)
    for generator in (None, gen):
        theta = net.values.clone()
        state = update.init_state(theta)
        for t, (x, y) in enumerate(_train_batches(3)):
            result = train_step(net, theta, x, y, Exact(), update, {}, state, t, generator=generator)
            theta, state = result.theta, result.state
        results.append(theta)
    assert torch.equal(results[0], results[1]) and torch.equal(gen.get_state(), before)
    # the Trainer owns no generator and draws nothing from the global RNG
    model, batch = _plain_mlp(), _train_batches(1)[0]
    torch.manual_seed(9)
    expected = torch.rand(3)
    torch.manual_seed(9)
    trainer = mp.Trainer(model, rule="exact", update=SGD(lr=0.1))
    trainer.step(*batch)
    assert trainer.generator is None and trainer.state_dict()["generator"] is None
    assert torch.equal(torch.rand(3), expected)
