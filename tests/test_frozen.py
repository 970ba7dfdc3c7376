"""Frozen parameters (``requires_grad=False``): compiled as such, never trained, reported.

The oracle for training is ``torch.optim`` with the frozen parameters left out of the optimizer;
for every rule and update the frozen values must stay bit for bit what they were.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

import mpbackprop as mp
from mpbackprop import verify
from mpbackprop._json import loads_strict
from mpbackprop.cli import main
from mpbackprop.engine import train_step
from mpbackprop.graph import write_graphml, write_json
from mpbackprop.rules import SGD, Adam, LearnedBackward

DT = torch.float64


def _mlp(dtype: torch.dtype = DT) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).to(dtype)
    model[2].requires_grad_(False)  # the middle layer, weight and bias
    model[4].bias.requires_grad_(False)
    return model


def _convnet() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Tanh(), nn.Flatten(), nn.Linear(72, 5), nn.ReLU(), nn.Linear(5, 3))
    model[0].weight.requires_grad_(False)  # the conv's bias stays trainable
    model[5].requires_grad_(False)
    return model


def _batches(shape: tuple[int, ...], n: int, dtype: torch.dtype = DT) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(7, *shape, generator=gen, dtype=dtype), torch.randint(0, 3, (7,), generator=gen))
            for _ in range(n)]


def _frozen(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in model.named_parameters() if not p.requires_grad}


# --------------------------------------------------------------------------------- vs torch.optim
@pytest.mark.parametrize("update, optim", [
    (lambda: SGD(lr=0.1), lambda ps: torch.optim.SGD(ps, lr=0.1)),
    (lambda: SGD(lr=0.05, momentum=0.9), lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)),
    (lambda: Adam(lr=1e-2), lambda ps: torch.optim.Adam(ps, lr=1e-2)),
], ids=["sgd", "sgd-momentum", "adam"])
def test_exact_training_equals_torch_with_frozen_layers_left_out_of_the_optimizer(update, optim) -> None:
    model = _mlp()
    ref = copy.deepcopy(model)
    frozen = _frozen(model)
    trainer = mp.Trainer(model, rule="exact", update=update())
    opt = optim([p for p in ref.parameters() if p.requires_grad])
    for x, y in _batches((6,), 6):
        trainer.step(x, y)
        opt.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        if name in frozen:
            assert torch.equal(p, frozen[name]) and torch.equal(q, frozen[name]), name
        else:
            assert (p - q).abs().max() <= 1e-12, name
            assert not torch.equal(p, dict(_mlp().named_parameters())[name]), name  # it did train


# ------------------------------------------------------------------------- every rule, every update
#: every backward rule with every update; the shipped default rule also with its own learned update (None)
COMBOS = [(r, u) for r in ("exact", "fa", "learned", "default") for u in ("sgd", "adam", "learned")]
COMBOS.append(("default", None))


@pytest.mark.parametrize("rule, update", COMBOS, ids=[f"{r}-{u or 'own'}" for r, u in COMBOS])
def test_frozen_parameters_stay_fixed_bit_for_bit(rule: str, update: str | None) -> None:
    model = _convnet()
    frozen = _frozen(model)
    trainable = {k: p.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    trainer = mp.Trainer(model, rule=rule, update=update, total_steps=50)  # the scheduled update needs it
    for x, y in _batches((1, 8, 8), 3, torch.float32):
        assert torch.isfinite(torch.tensor(trainer.step(x, y)))
    for name, p in model.named_parameters():
        if name in frozen:
            assert torch.equal(p, frozen[name]), name
        else:
            assert not torch.equal(p, trainable[name]), name
    mask = trainer.net.frozen_mask
    assert mask is not None and int(mask.sum()) == sum(t.numel() for t in frozen.values())
    for key, value in trainer.opt_state.items():  # no update state accumulates for frozen parameters
        if value.shape[-1:] == mask.shape:
            assert not value[..., mask].any(), key


def test_freezing_between_steps_takes_effect() -> None:
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    trainer = mp.Trainer(model, rule="exact", update=SGD(lr=0.1))
    batches = _batches((6,), 3)
    trainer.step(*batches[0])
    assert trainer.net.frozen_mask is None
    model[0].weight.requires_grad_(False)
    before = model[0].weight.detach().clone()
    trainer.step(*batches[1])
    assert torch.equal(model[0].weight, before)
    assert int(trainer.net.graph.nodes["param"].data["frozen"].sum()) == 24
    model[0].weight.requires_grad_(True)
    trainer.step(*batches[2])
    assert not torch.equal(model[0].weight, before)
    assert trainer.net.frozen_mask is None


def test_differentiable_step_keeps_frozen_entries_and_their_meta_gradient_path() -> None:
    model = _mlp()
    net = mp.compile(model, (6,))
    rule = LearnedBackward().double()
    update = SGD(lr=0.1)
    theta = net.values.clone()
    x, y = _batches((6,), 1)[0]
    r = train_step(net, theta, x, y, rule, update, rule.init_state(net), update.init_state(theta), 0,
                   differentiable=True)
    mask = net.frozen_mask
    assert torch.equal(r.theta[mask], theta[mask])
    meta = [p for p in rule.parameters() if p.requires_grad]
    grads = torch.autograd.grad(r.theta[~mask].square().sum(), meta, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


# ----------------------------------------------------------------------------- graph and reports
def test_frozen_shows_in_the_graph_summary_and_saved_files(tmp_path) -> None:
    model = _mlp()
    net = mp.compile(model, (6,))
    frozen = net.graph.nodes["param"].data["frozen"]
    expect = torch.cat([torch.full((p.numel(),), int(not p.requires_grad)) for p in model.parameters()])
    assert frozen.dtype == torch.int64 and torch.equal(frozen, expect)
    summary = net.summary()
    assert summary["frozen_params"] == 8 * 8 + 8 + 3 == net.num_frozen
    assert [layer["frozen"] for layer in summary["layers"]] == [0, 0, 72, 3]
    for fmt in ("bin", "json", "graphml"):
        path = tmp_path / f"net.{fmt}"
        {"bin": net.save, "json": lambda p: write_json(net, p), "graphml": lambda p: write_graphml(net, p)}[fmt](path)
        back = mp.load(path)
        assert back.summary() == summary, fmt
        assert torch.equal(back.frozen_mask, net.frozen_mask), fmt
        assert torch.equal(back.graph.nodes["param"].data["frozen"], frozen), fmt


@pytest.mark.parametrize("rule", ["exact", "fa"])
def test_verify_handles_frozen_parameters(rule: str) -> None:
    report = verify(_mlp(), (6,), rule=rule)
    assert report.ok and report.max_abs_err <= 1e-10
    assert report.frozen_params == 75
    assert [(r["layer"], r["frozen"]) for r in report.layers] == [(1, 0), (2, 72), (3, 3)]


def test_cli_inspect_and_verify_report_frozen_counts(tmp_path) -> None:
    src = tmp_path / "frozen.py"
    src.write_text("import torch.nn as nn\nINPUT_SHAPE = (6,)\n"
                   "model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))\n"
                   "model[0].weight.requires_grad_(False)\n")
    runner = CliRunner()
    res = runner.invoke(main, ["compile", str(src), "-o", str(tmp_path / "f.bin")], catch_exceptions=False)
    assert res.exit_code == 0 and "params: 83 (48 frozen)" in res.stdout, res.output
    res = runner.invoke(main, ["inspect", str(tmp_path / "f.bin"), "--json"], catch_exceptions=False)
    doc = loads_strict(res.stdout)
    assert doc["frozen_params"] == 48 and [d["frozen"] for d in doc["layers"]] == [0, 48, 0]
    res = runner.invoke(main, ["inspect", str(tmp_path / "f.bin")], catch_exceptions=False)
    lines = res.stdout.splitlines()
    header = lines[lines.index("layers:") + 1].split()
    assert header[6] == "frozen" and lines[lines.index("layers:") + 2].split()[6] == "0"
    assert lines[lines.index("layers:") + 3].split()[6] == "48"
    assert "frozen: 48 params" in res.stdout
    res = runner.invoke(main, ["verify", str(src), "--json"], catch_exceptions=False)
    assert res.exit_code == 0
    assert json.loads(res.stdout)["frozen_params"] == 48
