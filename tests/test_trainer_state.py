"""``Trainer`` as a ``torch.optim`` optimizer: ``state_dict`` checkpoints, DataLoader loops, schedules.

The resume tests interrupt a run at step ``k``, save model and trainer with ``torch.save``, read them
back with ``weights_only=True`` into a fresh model (initialised differently) and a fresh trainer, and
require the finished parameters to equal an uninterrupted run's bit for bit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import mpbackprop as mp
from mpbackprop.rules import SGD, Adam

STEPS, CUT = 12, 5


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 3))


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(3)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)) for _ in range(STEPS)]


# rule, update factory, total_steps, schedule
CASES: dict[str, tuple[str, Callable[[], Any], int | None, Callable[[int], float] | None]] = {
    "exact+adam": ("exact", lambda: Adam(lr=1e-2), None, None),
    "fa+adam": ("fa", lambda: Adam(lr=1e-2), None, None),
    "fa+sgd-momentum+schedule": ("fa", lambda: SGD(lr=0.05, momentum=0.9), None, lambda t: 1 / (1 + 0.3 * t)),
    "learned+learned": ("learned", lambda: "learned", None, None),
    "default (scheduled update)": ("default", lambda: None, STEPS, None),
}


def _trainer(model: nn.Module, case: str, total_steps: int | None = -1) -> mp.Trainer:
    rule, update, total, schedule = CASES[case]
    return mp.Trainer(model, rule=rule, update=update(), total_steps=total if total_steps == -1 else total_steps,
                      schedule=schedule)


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("when", ["before the first step", "after a step"])
@pytest.mark.parametrize("case", list(CASES))
def test_interrupted_run_resumes_exactly(case: str, when: str, tmp_path: Path) -> None:
    batches = _batches()
    whole = _model(0)
    trainer = _trainer(whole, case)
    for x, y in batches:
        trainer.step(x, y)

    first = _model(0)
    trainer = _trainer(first, case)
    for x, y in batches[:CUT]:
        trainer.step(x, y)
    torch.save({"model": first.state_dict(), "trainer": trainer.state_dict()}, tmp_path / "ckpt.pt")
    del first, trainer

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    second = _model(1)  # a different initialisation: everything must come from the checkpoint
    # total_steps comes from the checkpoint too (a trainer must be told some length to take a step)
    resumed = _trainer(second, case, total_steps=None if when == "before the first step" else 99)
    if when == "after a step":
        resumed.step(*batches[-1])
    second.load_state_dict(ckpt["model"])
    resumed.load_state_dict(ckpt["trainer"])
    assert resumed.steps == CUT and resumed.total_steps == CASES[case][2]
    for x, y in batches[CUT:]:
        resumed.step(x, y)
    for a, b in zip(_params(whole), _params(second)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("case", ["exact+adam", "default (scheduled update)"])
def test_resuming_without_the_trainer_state_is_not_the_same_run(case: str) -> None:
    """The check above has teeth: the moments and step count matter."""
    batches = _batches()
    whole, part = _model(0), _model(0)
    for model, cut in ((whole, STEPS), (part, CUT)):
        trainer = _trainer(model, case)
        for x, y in batches[:cut]:
            trainer.step(x, y)
    trainer = _trainer(part, case)  # fresh moments, step 0
    for x, y in batches[CUT:]:
        trainer.step(x, y)
    assert not all(torch.equal(a, b) for a, b in zip(_params(whole), _params(part)))


def test_state_dict_holds_rule_state_moments_and_counts() -> None:
    model = _model(0)
    trainer = _trainer(model, "fa+adam")
    assert trainer.state_dict()["rule_state"] == {} and trainer.state_dict()["steps"] == 0
    for x, y in _batches()[:3]:
        trainer.step(x, y)
    sd = trainer.state_dict()
    assert sd["steps"] == 3 and sd["rule"]["name"] == "fa" and sd["update"]["config"]["lr"] == 1e-2
    assert len(sd["rule_state"]) == 3 and all(k.startswith("B") for k in sd["rule_state"])  # one per weight
    assert sorted(sd["update_state"]) == ["m", "v"]
    assert sd["update_state"]["m"].shape == (sum(p.numel() for p in model.parameters()),)
    assert torch.equal(sd["update_state"]["v"], trainer.opt_state["v"])
    assert sd["update_state"]["v"] is not trainer.opt_state["v"]  # a copy: later steps do not change it


def test_learned_weights_travel_with_the_state_dict() -> None:
    a, b = _trainer(_model(0), "default (scheduled update)"), _trainer(_model(0), "default (scheduled update)")
    with torch.no_grad():
        for p in a.update.parameters():
            p.add_(0.125)
    b.load_state_dict(a.state_dict())
    for p, q in zip(a.update.parameters(), b.update.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("change, message", [
    (lambda sd: sd.pop("update_state"), "missing update_state"),
    (lambda sd: sd["rule"].update(name="exact"), "rule is exact"),
    (lambda sd: sd["update"]["config"].update(lr=0.5), "update is adam"),
    (lambda sd: sd.update(steps=-1), "steps must be"),
    (lambda sd: sd["update_state"].update(m=torch.zeros(5)), "does not fit this model"),
])
def test_load_state_dict_refuses_what_does_not_fit(change: Callable, message: str) -> None:
    trainer = _trainer(_model(0), "fa+adam")
    trainer.step(*_batches()[0])
    sd = trainer.state_dict()
    change(sd)
    other = _trainer(_model(0), "fa+adam")
    other.step(*_batches()[0])
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(sd)


def test_dataloader_loop_matches_torch_optim() -> None:
    """An ordinary DataLoader loop, shuffled, with a short last batch: the same parameters as autograd +
    torch.optim.SGD on the same batches."""
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(50, 6, dtype=torch.float64), torch.randint(0, 3, (50,), generator=gen))
    ours, ref = _model(0).double(), _model(0).double()
    trainer = mp.Trainer(ours, rule="exact", update=SGD(lr=0.1, momentum=0.9))
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for epoch in range(2):
        for x, y in DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
            trainer.step(x, y)
        for x, y in DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(epoch)):
            opt.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            opt.step()
    assert trainer.steps == 8
    for a, b in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_schedule_multiplies_the_step() -> None:
    batches = _batches()
    half, plain = _model(0).double(), _model(0).double()
    scheduled = mp.Trainer(half, rule="exact", update=SGD(lr=0.2), schedule=lambda t: 0.5 if t % 2 else 1.0)
    reference = mp.Trainer(plain, rule="exact", update=SGD(lr=0.2))
    for t, (x, y) in enumerate(batches[:4]):
        scheduled.step(x.double(), y)
        reference.update = SGD(lr=0.1 if t % 2 else 0.2)
        reference.step(x.double(), y)
    for a, b in zip(half.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_schedule_composes_with_the_learned_update() -> None:
    """A zero multiplier stops the parameters, not the learned update's moments."""
    model = _model(0)
    before = _params(model)
    trainer = mp.Trainer(model, rule="default", total_steps=10, schedule=lambda t: 0.0)
    for x, y in _batches()[:3]:
        trainer.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    assert float(trainer.opt_state["v"].abs().sum()) > 0


@pytest.mark.parametrize("bound", [False, True])
def test_loaded_rule_state_replaces_the_fresh_one(bound: bool) -> None:
    """Feedback matrices come from the checkpoint, not from the rule's seed."""
    trainer = _trainer(_model(0), "fa+adam")
    trainer.step(*_batches()[0])
    sd = trainer.state_dict()
    sd["rule_state"] = {k: 2 * v for k, v in sd["rule_state"].items()}
    other = _trainer(_model(0), "fa+adam")
    if bound:
        other.step(*_batches()[0])
    other.load_state_dict(sd)
    other.step(*_batches()[1])
    for key, value in sd["rule_state"].items():
        assert torch.equal(other.rule_state[key], value)
    assert not torch.equal(other.rule_state[key], trainer.rule_state[key])


# ------------------------------------------------------------------------- dropout masks (Trainer(seed=))
def _dropout_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Dropout(0.3), nn.Linear(10, 3)).double()


@pytest.mark.parametrize("when", ["before the first step", "after a step"])
@pytest.mark.parametrize("update", ["sgd", "adam"])
def test_resumed_run_draws_the_same_dropout_masks(update: str, when: str, tmp_path: Path) -> None:
    """3 steps, checkpoint (the generator's state with it), 3 more in a fresh trainer == 6 uninterrupted."""
    make = (lambda: SGD(lr=0.1, momentum=0.9)) if update == "sgd" else (lambda: Adam(lr=1e-2))
    batches = [(x.double(), y) for x, y in _batches()[:6]]
    whole = _dropout_model(0)
    trainer = mp.Trainer(whole, rule="exact", update=make(), seed=7)
    for x, y in batches:
        trainer.step(x, y)

    first = _dropout_model(0)
    trainer = mp.Trainer(first, rule="exact", update=make(), seed=7)
    for x, y in batches[:3]:
        trainer.step(x, y)
    sd = trainer.state_dict()
    assert sd["generator"] is not None and torch.equal(sd["generator"], trainer.generator.get_state())
    torch.save({"model": first.state_dict(), "trainer": sd}, tmp_path / "ckpt.pt")
    del first, trainer

    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    second = _dropout_model(1)
    resumed = mp.Trainer(second, rule="exact", update=make(), seed=123)  # the seed comes from the checkpoint
    if when == "after a step":
        resumed.step(*batches[-1])  # moves its own generator on: the checkpoint's state must replace it
    second.load_state_dict(ckpt["model"])
    resumed.load_state_dict(ckpt["trainer"])
    if when == "before the first step":  # not bound yet: the loaded state is handed back as it came
        assert torch.equal(resumed.state_dict()["generator"], ckpt["trainer"]["generator"])
    for x, y in batches[3:]:
        resumed.step(x, y)
    for a, b in zip(_params(whole), _params(second)):
        assert torch.equal(a, b)

    # teeth: the same resume without the generator's state (a fresh seed-7 generator) is another run
    third = _dropout_model(1)
    other = mp.Trainer(third, rule="exact", update=make(), seed=7)
    third.load_state_dict(ckpt["model"])
    other.load_state_dict({**ckpt["trainer"], "generator": None})
    for x, y in batches[3:]:
        other.step(x, y)
    assert not all(torch.equal(a, b) for a, b in zip(_params(whole), _params(third)))


def test_generator_state_does_not_fit_a_model_without_dropout() -> None:
    trainer = mp.Trainer(_dropout_model(0), rule="exact", update=SGD(lr=0.1), seed=0)
    trainer.step(_batches()[0][0].double(), _batches()[0][1])
    sd = trainer.state_dict()
    plain = mp.Trainer(_model(0).double(), rule="exact", update=SGD(lr=0.1))
    plain.step(_batches()[0][0].double(), _batches()[0][1])
    with pytest.raises(ValueError, match="no Dropout"):
        plain.load_state_dict({**sd, "update_state": {}})
    with pytest.raises(ValueError, match="uint8"):
        trainer.load_state_dict({**sd, "generator": [1, 2]})
