"""``device=`` / ``--device``: resolution, refusals, and the CPU default unchanged bit for bit.

CI has no GPU: CUDA's absence is the real one here (or monkeypatched), the DGL-path refusal is exercised on
the ``meta`` device (which, like CUDA, refuses to mix with CPU tensors), and the one CUDA test is skipped.
"""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import mpbackprop as mp
from mpbackprop.cli import main
from mpbackprop.device import DEVICES, DeviceError, check_kernels, place, reference_blocks, resolve
from mpbackprop.engine import InnerStep
from mpbackprop.metatrain.config import MetaConfig
from mpbackprop.rules import Adam, load_rule, make_backward, make_update, rule_path
from mpbackprop.rules.learned import LearnedBackward

NO_CUDA = "CUDA is not available on this machine (torch.cuda.is_available() is False); use --device cpu"


def _mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))


class _Residual(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.tanh(self.a(x)) + x)


def _conv() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.Flatten(),
                               torch.nn.Linear(18, 3))


def _batches(n: int, dtype: torch.dtype = torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


# ------------------------------------------------------------------ resolution
def test_resolve_names() -> None:
    assert DEVICES == ("cpu", "cuda")
    assert resolve("cpu") == resolve(None) == resolve(torch.device("cpu")) == torch.device("cpu")
    for bad in ("gpu", "tpu", "", "cuda0", "meta"):
        with pytest.raises(DeviceError, match="unknown device"):
            resolve(bad)


@pytest.mark.parametrize("name", ["cuda", "cuda:0", torch.device("cuda")])
def test_cuda_without_cuda_is_one_clear_line(name: object, no_cuda: None) -> None:
    with pytest.raises(DeviceError) as info:
        resolve(name)  # type: ignore[arg-type]
    assert str(info.value) == NO_CUDA
    with pytest.raises(DeviceError, match="CUDA is not available"):
        mp.Trainer(_mlp(), device=name)  # type: ignore[arg-type]


# ------------------------------------------------------------------ the CPU default is unchanged
@pytest.mark.parametrize("rule,update,total", [("exact", "adam", None), ("fa", "sgd", None), ("default", None, 20)])
def test_explicit_cpu_equals_default_bitwise(rule: str, update: str | None, total: int | None) -> None:
    thetas = []
    for kw in ({}, {"device": "cpu"}, {"device": torch.device("cpu")}):
        model = _mlp()
        trainer = mp.Trainer(model, rule=rule, update=update, total_steps=total, **kw)
        losses = [trainer.step(x, y) for x, y in _batches(4)]
        thetas.append((losses, trainer.theta.clone(), {k: v.clone() for k, v in trainer.opt_state.items()}))
        assert trainer.theta.device.type == "cpu"
    for losses, theta, state in thetas[1:]:
        assert losses == thetas[0][0]
        assert torch.equal(theta, thetas[0][1])
        assert all(torch.equal(state[k], thetas[0][2][k]) for k in state)


# ------------------------------------------------------------------ which blocks need the DGL path
def test_reference_blocks() -> None:
    mlp, res, conv = mp.compile(_mlp(), (6,)), mp.compile(_Residual(), (4,)), mp.compile(_conv(), (1, 8, 8))
    default = load_rule(rule_path("default"))[0]
    for rule in (make_backward("exact"), make_backward("fa"), make_backward("learned"), default):
        assert reference_blocks(mlp, rule) == [] and reference_blocks(conv, rule) == []
        assert reference_blocks(res, rule) == ["add (add)"]  # fixed combinations have no dense path
    assert reference_blocks(conv, LearnedBackward(state_dim=2)) == ["0 (conv2d)"]  # d > 1: full coefficients
    assert len(reference_blocks(mlp, make_backward("exact"), fused=False)) == 2
    check_kernels(res, make_backward("exact"), torch.device("cpu"))  # the CPU runs every path
    given = (mlp.values.clone(), make_backward("exact"), make_update("sgd"))
    assert all(a is b for a, b in zip(place(mlp, *given, torch.device("cpu")), given))  # the CPU: no copy
    with pytest.raises(DeviceError, match="add \\(add\\)"):
        place(res, res.values.clone(), make_backward("exact"), make_update("sgd"), torch.device("meta"))


def test_dgl_path_refused_before_anything_moves() -> None:
    """A residual net (its ``add`` block has only the DGL path) on a non-CPU device: refused at the first
    step, naming the block, with the model's parameters still on the CPU."""
    model = _Residual()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = mp.Trainer(model, rule="exact", update="sgd")
    trainer.device = torch.device("meta")  # a non-CPU device without a GPU (resolve() only takes cpu/cuda)
    with pytest.raises(DeviceError) as info:
        trainer.step(torch.randn(3, 4), torch.randint(0, 2, (3,)))
    line = str(info.value)
    assert "\n" not in line and "add (add)" in line and "DGL reference path" in line and "--device cpu" in line
    assert trainer.inner is None
    assert all(p.device.type == "cpu" and torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(DeviceError, match="fused=False"):
        check_kernels(mp.compile(_mlp(), (6,)), make_backward("exact"), torch.device("meta"), fused=False)


@pytest.mark.parametrize("model,shape", [(_mlp, (6,)), (_conv, (1, 8, 8))])
@pytest.mark.parametrize("rule,update", [("exact", "sgd"), ("exact", "adam"), ("fa", "adam"), ("default", None)])
def test_dense_path_keeps_to_its_device(model, shape: tuple[int, ...], rule: str, update: str | None) -> None:
    """Steps on the ``meta`` device, which refuses CPU operands as CUDA does: the forward pass, the dense
    backward kernels and the update create no tensor on the CPU (the graph's DGL blocks stay there)."""
    net = mp.compile(model(), shape)
    if rule == "default":
        backward, upd, _ = load_rule(rule_path("default"))
    else:
        backward, upd = make_backward(rule), make_update(update)
    dev = torch.device("meta")
    theta, backward, upd = place(net, net.values.clone(), backward, upd, dev)
    assert theta.device == dev and all(p.device == dev for p in [*backward.parameters(), *upd.parameters()])
    run = InnerStep.start(net, theta, backward, upd, total_steps=10)
    for _ in range(2):
        result = run.step(torch.randn(4, *shape), torch.randint(0, 3, (4,)))  # a CPU batch, moved by step()
    assert result.theta.device == dev and all(v.device == dev for v in run.opt_state.values())


# ------------------------------------------------------------------ meta-training config
def test_metaconfig_device_round_trip_and_old_json(tmp_path) -> None:
    cfg = MetaConfig(device="cuda")  # a name; availability is the run's business
    assert MetaConfig.from_json(json.loads(cfg.dumps())).device == "cuda"
    assert json.loads(MetaConfig().dumps())["device"] == "cpu"
    old = MetaConfig().to_json()
    del old["device"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert MetaConfig.load_run(tmp_path / "config.json").device == "cpu"
    with pytest.raises(ValueError, match="device must be one of cpu, cuda"):
        MetaConfig(device="gpu")


def test_meta_training_refuses_cuda_without_cuda(tmp_path, no_cuda: None) -> None:
    from mpbackprop.metatrain import MetaTrainer

    with pytest.raises(DeviceError, match="CUDA is not available"):
        MetaTrainer(MetaConfig(device="cuda", outer_steps=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # refused before the directory is made


# ------------------------------------------------------------------ CUDA (skipped without a GPU)
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("rule,update,total", [("exact", "adam", None), ("fa", "sgd", None), ("default", None, 20)])
def test_cuda_trainer_matches_cpu_in_float64(rule: str, update: str | None, total: int | None) -> None:
    runs = []
    for device in ("cpu", "cuda"):
        model = _mlp().double()
        trainer = mp.Trainer(model, rule=rule, update=update, total_steps=total, device=device)
        losses = [trainer.step(x, y) for x, y in _batches(5, torch.float64)]
        assert trainer.theta.device.type == device and next(model.parameters()).device.type == device
        runs.append((losses, trainer.theta.detach().cpu()))
    assert runs[1][0] == pytest.approx(runs[0][0], abs=1e-10)
    assert torch.allclose(runs[1][1], runs[0][1], rtol=0, atol=1e-10)


# ------------------------------------------------------------------ command line
@pytest.mark.parametrize("cmd", [["evaluate", "default"], ["analyze", "default"], ["meta-train"]])
def test_cli_device(cmd: list[str], tmp_path, no_cuda: None) -> None:
    runner = CliRunner()
    bad = runner.invoke(main, [*cmd, "--device", "gpu"])
    assert bad.exit_code == 2 and "--device" in bad.output and "Traceback" not in bad.output
    res = runner.invoke(main, [*cmd, "--device", "cuda", *(["--out", str(tmp_path / "r")] if cmd == ["meta-train"]
                                                            else [])])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.splitlines() if ln.startswith("Error")]
    assert lines == [f"Error: {NO_CUDA}"], res.output
    assert "Traceback" not in res.output


def test_bench_device(no_cuda: None, capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "tools" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench_for_device_test", path)
    bench = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(bench)  # type: ignore[union-attr]
    for bad in ("cuda", "gpu"):
        with pytest.raises(SystemExit) as info:
            bench.main(["--quick", "--device", bad])
        assert info.value.code == 2
    assert "CUDA is not available" in capsys.readouterr().err
    case = bench.bench_case("mlp-4-4-10", 4, 1, fused="off", device="cpu")
    assert set(case["ms_per_step"]) >= {"exact", "fa", "learned"}
