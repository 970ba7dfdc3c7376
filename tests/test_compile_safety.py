"""``mpbackprop.compile`` refuses what would make the graph's gradient differ from the module's.

In-place changes of tensors that are read again, no_grad blocks, detach, custom autograd
Functions, backward hooks, reparametrized weights, networks without parameters, input shapes
with a batch axis or of the wrong type, graphs over the memory limit — and, as a safety net, any
network whose compiled forward pass differs from the module's. What is common and correct
(``nn.ReLU(inplace=True)`` in an ``nn.Sequential``, ``h += g`` when nobody reads the old ``h``)
keeps compiling, with gradients equal to autograd's. The CLI side of each refusal is a row of
``tests/hostile_compile.py``.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpbackprop as mp
from mpbackprop.compiler import ForwardMismatchError, GraphTooLargeError, budget
from mpbackprop.compiler import trace as compiler
from mpbackprop.engine import signals
from mpbackprop.errors import ShapeError, UnsupportedOpError
from mpbackprop.graph import Activation
from mpbackprop.rules import Exact

DT = torch.float64
HERE = os.path.basename(__file__)


def _exact_error(model: nn.Module, shape: tuple[int, ...]) -> float:
    """Max |engine signal − autograd gradient| over all parameters, float64."""
    model = model.to(DT)
    net = mp.compile(model, shape)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, *shape, generator=gen, dtype=DT)
    y = torch.randint(0, net.layers[net.output_layer].size, (5,), generator=gen)
    got, _ = signals(net, x, y, Exact())
    grads = torch.autograd.grad(F.cross_entropy(model(x.clone()), y), list(model.parameters()))
    return float((got[:, 0] - torch.cat([g.reshape(-1) for g in grads])).abs().max())


# ------------------------------------------------------------------------------ the cases
class _Net(nn.Module):
    """Two Linear layers and a read-out around one hand-written ``body``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.fc2 = nn.Linear(6, 6)
        self.out = nn.Linear(6, 3)


class _SkipThenIadd(_Net):
    def forward(self, x):
        h = self.fc(x)
        skip = h
        h += self.fc2(h)  # IADD-LINE
        return self.out(h + skip)


class _MulUnderscoreAlias(_Net):
    def forward(self, x):
        h = self.fc(x)
        g = h.mul_(0.5)  # MUL-LINE
        return self.out(g + self.fc2(h))


class _AddUnderscoreUnassigned(_Net):
    def forward(self, x):
        h = self.fc(x)
        h.add_(self.fc2(x))  # ADD-LINE
        return self.out(h)


class _NoGrad(_Net):
    def forward(self, x):
        h = torch.tanh(self.fc(x))
        with torch.no_grad():
            g = self.fc2(h)  # NOGRAD-LINE
        return self.out(h + g)


class _Detach(_Net):
    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(h + self.fc2(h).detach())  # DETACH-LINE


class _Data(_Net):
    def forward(self, x):
        h = torch.tanh(self.fc(x))
        return self.out(h + self.fc2(h).data)  # DATA-LINE


class _Doubler(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        return grad * 5


class _CustomFunction(_Net):
    def forward(self, x):
        return self.out(_Doubler.apply(self.fc(x)))


class _InplaceReluReadAgain(_Net):
    def forward(self, x):
        h = self.fc(x)
        r = F.relu(h, inplace=True)  # RELU-LINE
        return self.out(r + h)


class _ViewMutated(_Net):
    """The mutation reaches the old tensor through a view of it."""

    def forward(self, x):
        h = self.fc(x)
        v = h.view(h.shape[0], 2, 3)
        v.mul_(2.0)  # VIEW-LINE
        return self.out(h)


def _line(cls: type, marker: str) -> int:
    import inspect

    lines, start = inspect.getsourcelines(cls)
    return start + next(k for k, text in enumerate(lines) if marker in text)


@pytest.mark.parametrize("cls, marker, words", [
    (_SkipThenIadd, "IADD-LINE", ["'+='", "in-place", "h = h + g"]),
    (_MulUnderscoreAlias, "MUL-LINE", ["Tensor.mul_", "in-place"]),
    (_AddUnderscoreUnassigned, "ADD-LINE", ["Tensor.add_", "in-place", "module 'out'"]),
    (_InplaceReluReadAgain, "RELU-LINE", ["relu", "in-place", "inplace=False"]),
    (_ViewMutated, "VIEW-LINE", ["Tensor.mul_", "through a view"]),
    (_NoGrad, "NOGRAD-LINE", ["'fc2'", "gradients disabled", "torch.no_grad()", "requires_grad"]),
    (_Detach, "DETACH-LINE", ["Tensor.detach", "stops"]),
    (_Data, "DATA-LINE", ["getattr", "stops"]),
], ids=["iadd-skip", "mul_-alias", "add_-unassigned", "inplace-relu-read-again", "view-mutated", "no-grad",
        "detach", "data"])
def test_gradient_changing_code_is_refused_with_op_and_line(cls: type, marker: str, words: list[str]) -> None:
    with pytest.raises(UnsupportedOpError) as err:
        mp.compile(cls(), (6,))
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, (w, msg)
    assert f"{HERE}:{_line(cls, marker)}" in msg, msg


def test_custom_autograd_function_is_refused_by_class_name() -> None:
    with pytest.raises(UnsupportedOpError) as err:
        mp.compile(_CustomFunction(), (6,))
    msg = str(err.value)
    assert "_Doubler" in msg and "backward" in msg and "_Doubler.apply" in msg
    assert f"{HERE}:" in msg


@pytest.mark.filterwarnings("ignore:torch.nn.utils.weight_norm is deprecated:UserWarning")
def test_backward_hook_and_reparametrized_weight_are_refused() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    model[2].register_full_backward_hook(lambda m, gi, go: gi)
    with pytest.raises(UnsupportedOpError, match=r"module '2' \(Linear\) has a backward hook"):
        mp.compile(model, (4,))
    for norm in (nn.utils.parametrizations.weight_norm, nn.utils.weight_norm):
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), norm(nn.Linear(4, 2)))
        with pytest.raises(UnsupportedOpError, match="weight is computed from other tensors"):
            mp.compile(model, (4,))


# -------------------------------------------------------------------------- what keeps compiling
class _InplaceFine(nn.Module):
    """In-place operations whose old values nobody reads again: exact, and compiled."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 6)
        self.b = nn.Linear(6, 6)
        self.c = nn.Linear(6, 6)
        self.d = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.a(x), inplace=True)
        skip = h
        g = self.b(h)
        g += skip  # the old g is read by nobody else
        g = g.mul_(0.5)
        h2 = self.c(torch.tanh(g))
        h2 = h2.sub_(0.25 * h2)
        return self.d(h2)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 7), nn.LeakyReLU(0.1, inplace=True),
                           nn.Linear(7, 3)), (5,)),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(72, 3)), (1, 8, 8)),
    (_InplaceFine, (5,)),
], ids=["sequential-inplace-acts", "conv-inplace-relu", "inplace-not-read-again"])
def test_inplace_operations_nobody_reads_around_still_compile_exactly(make, shape) -> None:
    torch.manual_seed(0)
    assert _exact_error(make(), shape) <= 1e-10


# ------------------------------------------------------------------------------------ safety net
def test_safety_net_names_the_first_block_that_differs(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler bug (here: tanh compiled as sigmoid) is caught by the forward check."""
    monkeypatch.setitem(compiler._MODULE_ACTS, nn.Tanh, lambda m: Activation("sigmoid"))
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2))
    with pytest.raises(ForwardMismatchError) as err:
        mp.compile(model, (4,))
    msg = str(err.value)
    assert "first differs at block 2 (linear '2'" in msg, msg
    assert "max difference" in msg and "float64" in msg and "\n" not in msg
    assert isinstance(err.value, UnsupportedOpError)  # the CLI reports it as a refusal


def test_safety_net_catches_a_forward_hook_that_changes_an_output() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    model[2].register_forward_hook(lambda m, i, o: o * 3)
    with pytest.raises(ForwardMismatchError, match=r"first differs at block 2 \(linear '2'.*max difference"):
        mp.compile(model, (4,))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    model[0].register_forward_hook(lambda m, i, o: None)  # a hook that only looks: fine
    mp.compile(model, (4,))


def test_safety_net_leaves_rng_parameters_and_dtype_alone() -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(11)
    rng = torch.get_rng_state()
    mp.compile(model, (6,))
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k


def test_non_finite_weights_compile_and_match_where_both_are_nan() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    net = mp.compile(model, (3,))
    assert torch.isnan(net.values).sum() == 1


# --------------------------------------------------------------------------- shapes and no params
def test_input_shape_with_a_batch_axis_is_refused_with_the_rule() -> None:
    mlp = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    for shape in [(1, 64), (32, 64)]:
        with pytest.raises(ShapeError) as err:
            mp.compile(mlp, shape)
        msg = str(err.value)
        assert "per sample, without the batch axis" in msg and "use (64,)" in msg, msg
        assert f"shape ({shape[0]}, 10), not a vector" in msg
    assert mp.compile(mlp, (64,)).output_shape == (10,)
    x = torch.randn(32, 64)
    assert mp.compile(mlp, x).input_shape == (64,)  # a batch: its leading axis is the batch axis


def test_output_maps_are_refused_without_a_batch_axis_hint() -> None:
    conv = nn.Sequential(nn.Conv2d(2, 2, 3), nn.ReLU())  # (2, 6, 6) per sample; 2 channels in and out
    with pytest.raises(ShapeError) as err:
        mp.compile(conv, (2, 8, 8))
    msg = str(err.value)
    assert "(2, 6, 6), not a vector" in msg and "nn.Flatten()" in msg and "batch size" not in msg


@pytest.mark.parametrize("shape", [{1: 4}, {4}, "4", 4.0, None, [], (2, True)])
def test_input_shape_that_is_not_a_sequence_of_ints_is_refused(shape) -> None:
    with pytest.raises(ShapeError, match="per sample, without the batch axis|empty") as err:
        mp.compile(nn.Sequential(nn.Linear(4, 2)), shape)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.ReLU(), (4,)),
    (lambda: nn.Sequential(nn.AvgPool2d(2), nn.Flatten()), (1, 4, 4)),
    (lambda: nn.Sequential(nn.Tanh(), nn.Identity()), (4,)),
], ids=["bare-activation", "pooling-only", "sequential-activation"])
def test_networks_without_parameters_are_refused(make, shape) -> None:
    with pytest.raises(UnsupportedOpError, match="has no parameters to train"):
        mp.compile(make(), shape)


# --------------------------------------------------------------------------------- memory limit
def test_estimate_counts_what_the_graph_holds() -> None:
    """For Linear networks the estimate is exact in uses, bias edges and params; conv and fixed
    edges are bounded from above."""
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    gm = compiler.symbolic_trace(model)
    with torch.no_grad():
        compiler._ShapeRecorder(gm, str).run(torch.zeros(2, 5))
    est = budget.estimate(gm, model)
    net = mp.compile(model, (5,))
    g = net.graph
    uses = sum(g.num_edges(e) for e in g.etypes if e.startswith("in_") and not e.endswith("_rev"))
    biases = sum(g.num_edges(e) for e in g.etypes if e.startswith("bias_") and not e.endswith("_rev"))
    assert (est.uses, est.bias_edges, est.params) == (uses, biases, net.num_params)
    assert est.neurons >= net.num_neurons
    conv = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 3))
    gm = compiler.symbolic_trace(conv)
    with torch.no_grad():
        compiler._ShapeRecorder(gm, str).run(torch.zeros(2, 1, 8, 8))
    est = budget.estimate(gm, conv)
    g = mp.compile(conv, (1, 8, 8)).graph
    assert est.uses >= g.num_edges("in_1") and est.fixed_edges >= g.num_edges("fixed_2")


def test_graph_over_the_limit_is_refused_before_anything_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*_a, **_k):
        raise AssertionError("the graph was built")

    monkeypatch.setattr(compiler._Builder, "run", never)
    monkeypatch.setenv(budget.ENV_VAR, "0.00001")
    with pytest.raises(GraphTooLargeError) as err:
        mp.compile(nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10)), (64,))
    msg = str(err.value)
    assert "more than the limit of 1e-05 GB" in msg and f"{budget.ENV_VAR}=1" in msg and "2,410 parameters" in msg
    for bad in ("abc", "0", "-1", "inf", "nan"):
        monkeypatch.setenv(budget.ENV_VAR, bad)
        with pytest.raises(GraphTooLargeError, match="not a positive number of gigabytes"):
            mp.compile(nn.Sequential(nn.Linear(4, 2)), (4,))


def test_default_limit_takes_the_benchmark_mlp_and_refuses_50m_parameters_at_once(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(budget.ENV_VAR, raising=False)
    big = torch.nn.utils.skip_init(nn.Linear, 7072, 7072)  # 50M parameters, left uninitialised
    monkeypatch.setattr(compiler._Builder, "run", lambda self: pytest.fail("the graph was built"))
    with pytest.raises(GraphTooLargeError) as err:
        mp.compile(big, (7072,))
    gb = float(str(err.value).split("about ")[1].split(" GB")[0])
    assert gb > 4 * budget.DEFAULT_LIMIT_GB and "50,020,256 parameters" in str(err.value)
    monkeypatch.undo()
    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    assert mp.compile(mlp, (784,)).num_params == 669_706
    assert math.isclose(budget.limit_gb(), budget.DEFAULT_LIMIT_GB)


# ---------------------------------------------------------------------------------------- Trainer
@pytest.mark.parametrize("cls", [_SkipThenIadd, _NoGrad, _CustomFunction])
def test_trainer_refuses_on_its_first_step_and_leaves_the_module_alone(cls: type) -> None:
    torch.manual_seed(0)
    model = cls()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = mp.Trainer(model, rule="exact", update="sgd")
    with pytest.raises(UnsupportedOpError):
        trainer.step(torch.randn(4, 6), torch.tensor([0, 1, 2, 0]))
    assert trainer.net is None
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
