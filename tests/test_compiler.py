"""Compiler tests: a table of small models must compile and reproduce the module exactly.

Every case in :data:`CASES` is a small float64 network built here. The reference oracle is
always the module itself (its output, its parameters, its submodules' output shapes), never
the compiler's own metadata. ``tests/test_graph_schema.py`` reuses the same table for the
schema, use-alignment and save/load checks.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpbackprop
from mpbackprop.errors import ShapeError, UnsupportedOpError
from mpbackprop.graph import ACTIVATION_IDS, KINDS, Activation

DT = torch.float64
ATOL = 1e-10

# padding="same" with an even kernel is one of the table's cases on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning")


# ------------------------------------------------------------------------------ the model table
@dataclass
class Case:
    """One small model: how to build it, its per-sample input shape, and what it must compile to.

    ``kinds`` is the expected block structure (block 0 is the input); ``acts`` optionally
    pins the activation of some blocks (block index → Activation); ``neurons`` optionally
    pins the total neuron count, computed by hand.
    """

    id: str
    make: Callable[[], nn.Module]
    shape: tuple[int, ...]
    kinds: tuple[str, ...]
    acts: dict[int, Activation] = field(default_factory=dict)
    neurons: int | None = None
    scale: float = 1.0  # input scale (large inputs reach softplus' threshold branch)


def _flat(body: nn.Module, shape: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(body(torch.zeros(1, *shape)).numel())


def _conv_head(body: nn.Sequential, shape: tuple[int, ...], n_out: int = 4, bias: bool = True) -> nn.Module:
    """``body`` followed by flatten and a Linear read-out."""
    return nn.Sequential(*body, nn.Flatten(), nn.Linear(_flat(body, shape), n_out, bias=bias))


ACT_MODULES: dict[str, tuple[Callable[[], nn.Module], Activation]] = {
    "relu": (nn.ReLU, Activation("relu")),
    "leaky_relu": (lambda: nn.LeakyReLU(0.1), Activation("leaky_relu", {"negative_slope": 0.1})),
    "elu": (lambda: nn.ELU(0.7), Activation("elu", {"alpha": 0.7})),
    "gelu": (nn.GELU, Activation("gelu", {"approximate": "none"})),
    "gelu_tanh": (lambda: nn.GELU(approximate="tanh"), Activation("gelu", {"approximate": "tanh"})),
    "silu": (nn.SiLU, Activation("silu")),
    "tanh": (nn.Tanh, Activation("tanh")),
    "sigmoid": (nn.Sigmoid, Activation("sigmoid")),
    "softplus": (lambda: nn.Softplus(beta=2.0, threshold=3.0),
                 Activation("softplus", {"beta": 2.0, "threshold": 3.0})),
    "identity": (nn.Identity, Activation("identity")),
}


def _mlp(act: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(nn.Linear(5, 7), act(), nn.Linear(7, 6), act(), nn.Linear(6, 3))


class FunctionalActs(nn.Module):
    """Activations in functional and method form, one per layer."""

    def __init__(self) -> None:
        super().__init__()
        self.fcs = nn.ModuleList(nn.Linear(6, 6) for _ in range(10))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        f = self.fcs
        x = F.relu(f[0](x))
        x = torch.relu(f[1](x))
        x = f[2](x).relu()
        x = torch.tanh(f[3](x))
        x = f[4](x).sigmoid()
        x = F.gelu(f[5](x), approximate="tanh")
        x = F.leaky_relu(f[6](x), 0.2)
        x = F.elu(f[7](x), alpha=0.5)
        x = F.softplus(f[8](x), beta=2.0)
        x = F.silu(f[9](x))
        return self.out(x)


FUNCTIONAL_ACTS = [
    Activation("relu"), Activation("relu"), Activation("relu"), Activation("tanh"), Activation("sigmoid"),
    Activation("gelu", {"approximate": "tanh"}), Activation("leaky_relu", {"negative_slope": 0.2}),
    Activation("elu", {"alpha": 0.5}), Activation("softplus", {"beta": 2.0, "threshold": 20.0}),
    Activation("silu"),
]


class ConvView(nn.Module):
    """Hand-written convnet forward; ``flatten`` picks the re-indexing form."""

    def __init__(self, flatten: str) -> None:
        super().__init__()
        self.flatten = flatten
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 2, 3, stride=2)
        self.fl = nn.Flatten()
        self.fc = nn.Linear(2 * 3 * 3, 4)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = torch.tanh(self.conv2(x))
        if self.flatten == "view":
            x = x.view(x.size(0), -1)
        elif self.flatten == "torch.flatten":
            x = torch.flatten(x, 1)
        elif self.flatten == "reshape":
            x = x.reshape(x.shape[0], -1)
        else:
            x = self.fl(x)
        return self.fc(x)


class FunctionalPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 3 * 4, 3)

    def forward(self, x):  # (2, 7, 9)
        x = F.avg_pool2d(torch.relu(self.conv(x)), 2)  # (3, 3, 4)
        x = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
        return self.fc(x.flatten(1))


class ResidualMLP(nn.Module):
    """``h + f(h)`` with f a small MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.f = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 6))
        self.out = nn.Linear(6, 2)

    def forward(self, x):
        h = F.relu(self.inp(x))
        return self.out(h + self.f(h))


class InputResidual(nn.Module):
    """``x + f(x)`` on the network input itself."""

    def __init__(self) -> None:
        super().__init__()
        self.f = nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 5))

    def forward(self, x):
        return x + self.f(x)


class Difference(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(5, 4)
        self.c = nn.Linear(4, 4)

    def forward(self, x):
        d = torch.sigmoid(self.a(x)) - self.b(x)
        e = torch.sub(d, self.c(d), alpha=2.0)
        return torch.add(e, d, alpha=0.5)


class SelfSum(nn.Module):
    """``h + h``: one block read twice by the same add."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x))
        return h + h


class Scaling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 5)
        self.c = nn.Linear(5, 5)
        self.d = nn.Linear(5, 2)

    def forward(self, x):
        x = 0.5 * torch.relu(self.a(x))
        x = self.b(x) / 2
        x = -torch.tanh(self.c(x))
        return self.d(x.mul(3.0))


class ActOnShared(nn.Module):
    """An activation applied to values also used raw: the activation needs a block of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h + F.relu(h))


class ActOnSharedViaIdentity(nn.Module):
    """As :class:`ActOnShared`, with the activation reached through an ``nn.Identity``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.skip = nn.Identity()
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(F.relu(self.skip(h)) + h)


class TwoActs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(F.relu(self.a(x))))


class ActOnInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)

    def forward(self, x):
        return self.a(torch.sigmoid(x))


class Shared3D(nn.Module):
    """Linear on a (positions, features) per-sample tensor: weights shared across positions."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(4, 2, bias=False)
        self.c = nn.Linear(3 * 2, 2)

    def forward(self, x):  # (3, 5)
        h = self.b(F.silu(self.a(x)))  # (3, 2)
        return self.c(h.reshape(h.shape[0], -1))


class GlobalPoolHead(nn.Module):
    """Ends in a view: the module returns (B, C), not the pooling block's (B, C, 1, 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)

    def forward(self, x):  # (2, 7, 9)
        x = F.avg_pool2d(torch.tanh(self.conv(x)), (5, 7))
        return x.view(x.size(0), -1)


class ReshapedOutput(nn.Module):
    """Ends in a reshape of a (2, 3) block to the vector the module returns."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 6)

    def forward(self, x):
        h = torch.sigmoid(self.a(x)).reshape(x.shape[0], 2, 3)
        return h.reshape(x.shape[0], 6)


def _case_table() -> list[Case]:
    cases: list[Case] = []
    for name, (act, expected) in ACT_MODULES.items():
        cases.append(Case(f"mlp-{name}", _mlp(act), (5,), ("input", "linear", "linear", "linear"),
                          acts={1: expected, 2: expected, 3: Activation()}, neurons=5 + 7 + 6 + 3, scale=2.0))
    cases += [
        Case("mlp-no-bias", lambda: nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 2, bias=False)),
             (5,), ("input", "linear", "linear"), neurons=11),
        Case("mlp-functional-acts", FunctionalActs, (6,), ("input",) + ("linear",) * 11,
             acts={k + 1: a for k, a in enumerate(FUNCTIONAL_ACTS)}, neurons=6 + 60 + 2),
        Case("conv-basic", lambda: _conv_head(nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU()), (1, 8, 8)),
             (1, 8, 8), ("input", "conv2d", "linear"), neurons=64 + 3 * 36 + 4),
        Case("conv-stride-pad", lambda: _conv_head(nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.Tanh(),
            nn.Conv2d(4, 3, (2, 3), stride=(1, 2), padding=(1, 0)), nn.ELU()), (2, 7, 9)),
             (2, 7, 9), ("input", "conv2d", "conv2d", "linear"), neurons=126 + 4 * 4 * 5 + 3 * 5 * 2 + 4),
        Case("conv-dilation", lambda: _conv_head(nn.Sequential(
            nn.Conv2d(2, 3, 3, dilation=2, padding=2), nn.SiLU(),
            nn.Conv2d(3, 2, 2, dilation=(2, 1), stride=2)), (2, 7, 9)),
             (2, 7, 9), ("input", "conv2d", "conv2d", "linear"), neurons=126 + 3 * 63 + 2 * 3 * 4 + 4),
        Case("conv-same-1x8x8", lambda: _conv_head(nn.Sequential(
            nn.Conv2d(1, 2, 4, padding="same"), nn.ReLU(),  # even kernel: asymmetric padding
            nn.Conv2d(2, 2, 3, padding="same", dilation=2), nn.Sigmoid()), (1, 8, 8)),
             (1, 8, 8), ("input", "conv2d", "conv2d", "linear"), neurons=64 + 128 + 128 + 4),
        Case("conv-same-2x7x9", lambda: _conv_head(nn.Sequential(
            nn.Conv2d(2, 3, (2, 3), padding="same"), nn.GELU()), (2, 7, 9)),
             (2, 7, 9), ("input", "conv2d", "linear"), neurons=126 + 189 + 4),
        Case("conv-valid-no-bias", lambda: _conv_head(nn.Sequential(
            nn.Conv2d(2, 3, 3, padding="valid", bias=False), nn.LeakyReLU(0.3)), (2, 7, 9), bias=False),
             (2, 7, 9), ("input", "conv2d", "linear"), neurons=126 + 3 * 5 * 7 + 4),
        Case("conv-1x1", lambda: _conv_head(nn.Sequential(nn.Conv2d(1, 2, 1), nn.Softplus()), (1, 8, 8)),
             (1, 8, 8), ("input", "conv2d", "linear")),
        Case("pool-basic", lambda: _conv_head(nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)), (1, 8, 8)),
             (1, 8, 8), ("input", "conv2d", "avgpool2d", "linear"), neurons=64 + 128 + 32 + 4),
        Case("pool-padding", lambda: _conv_head(nn.Sequential(
            nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(), nn.AvgPool2d(3, stride=2, padding=1)), (2, 7, 9)),
             (2, 7, 9), ("input", "conv2d", "avgpool2d", "linear"), neurons=126 + 126 + 2 * 4 * 5 + 4),
        Case("pool-no-count-pad", lambda: _conv_head(nn.Sequential(
            nn.Conv2d(2, 2, 3, padding=1), nn.Tanh(),
            nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)), (2, 7, 9)),
             (2, 7, 9), ("input", "conv2d", "avgpool2d", "linear")),
        Case("pool-divisor", lambda: _conv_head(nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.AvgPool2d((2, 3), stride=(2, 1), divisor_override=5)), (1, 8, 8)),
             (1, 8, 8), ("input", "conv2d", "avgpool2d", "linear")),
        Case("pool-on-input", lambda: _conv_head(nn.Sequential(nn.AvgPool2d(2, padding=1)), (2, 7, 9)),
             (2, 7, 9), ("input", "avgpool2d", "linear"), neurons=126 + 2 * 4 * 5 + 4),
        Case("pool-functional", FunctionalPool, (2, 7, 9),
             ("input", "conv2d", "avgpool2d", "avgpool2d", "linear"), neurons=126 + 189 + 36 + 36 + 3),
        Case("residual-mlp", ResidualMLP, (4,), ("input", "linear", "linear", "linear", "add", "linear"),
             acts={1: Activation("relu"), 2: Activation("tanh")}, neurons=4 + 6 + 5 + 6 + 6 + 2),
        Case("residual-input", InputResidual, (5,), ("input", "linear", "linear", "add"), neurons=5 + 8 + 5 + 5),
        Case("difference", Difference, (5,), ("input", "linear", "linear", "add", "linear", "add", "add"),
             acts={1: Activation("sigmoid")}, neurons=5 + 4 * 6),
        Case("self-sum", SelfSum, (4,), ("input", "linear", "add"), neurons=4 + 3 + 3),
        Case("scaling", Scaling, (4,), ("input", "linear", "scale", "linear", "scale", "linear", "scale",
                                        "scale", "linear"),
             acts={1: Activation("relu"), 5: Activation("tanh")}, neurons=4 + 5 * 7 + 2),
        Case("act-on-shared", ActOnShared, (4,), ("input", "linear", "act", "add", "linear"),
             acts={1: Activation(), 2: Activation("relu"), 3: Activation()}, neurons=4 + 5 * 3 + 3),
        Case("act-on-shared-identity", ActOnSharedViaIdentity, (4,), ("input", "linear", "act", "add", "linear"),
             acts={1: Activation(), 2: Activation("relu"), 3: Activation()}, neurons=4 + 5 * 3 + 3),
        Case("two-acts", TwoActs, (4,), ("input", "linear", "act", "linear"),
             acts={1: Activation("relu"), 2: Activation("tanh")}, neurons=4 + 5 + 5 + 3),
        Case("act-on-input", ActOnInput, (4,), ("input", "act", "linear"),
             acts={0: Activation(), 1: Activation("sigmoid")}, neurons=4 + 4 + 3),
        Case("linear-3d", Shared3D, (3, 5), ("input", "linear", "linear", "linear"),
             acts={1: Activation("silu")}, neurons=15 + 12 + 6 + 2),
        Case("linear-3d-seq", lambda: nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2), nn.Flatten()),
             (2, 3, 5), ("input", "linear", "linear"), neurons=30 + 24 + 12),
    ]
    cases += [
        Case("output-view", GlobalPoolHead, (2, 7, 9), ("input", "conv2d", "avgpool2d"), neurons=126 + 105 + 3),
        Case("output-reshape", ReshapedOutput, (4,), ("input", "linear"), acts={1: Activation("sigmoid")},
             neurons=4 + 6),
        Case("output-flatten-module", lambda: nn.Sequential(nn.Conv2d(1, 2, 3, stride=2), nn.ReLU(), nn.Flatten()),
             (1, 8, 8), ("input", "conv2d"), neurons=64 + 18),
    ]
    for form in ("view", "torch.flatten", "reshape", "nn.Flatten"):
        cases.append(Case(f"conv-{form}", lambda form=form: ConvView(form), (1, 8, 8),
                          ("input", "conv2d", "conv2d", "linear"),
                          acts={1: Activation("relu"), 2: Activation("tanh")}, neurons=64 + 192 + 18 + 4))
    return cases


CASES = _case_table()
CASE_IDS = [c.id for c in CASES]


_BUILT: dict[tuple[str, int], tuple[nn.Module, mpbackprop.CompiledNetwork, torch.Tensor]] = {}


def build(case: Case, seed: int = 0, fresh: bool = False) -> tuple[nn.Module, mpbackprop.CompiledNetwork, torch.Tensor]:
    """The case's float64 module with random weights, its compiled network and a random input batch.

    Read-only tests share one build per (case, seed); a test that changes the module or the
    network asks for a ``fresh`` one.
    """
    if fresh:
        return _build(case, seed)
    key = (case.id, seed)
    if key not in _BUILT:
        _BUILT[key] = _build(case, seed)
    return _BUILT[key]


def _build(case: Case, seed: int) -> tuple[nn.Module, mpbackprop.CompiledNetwork, torch.Tensor]:
    torch.manual_seed(seed)
    model = case.make().to(DT)
    with torch.no_grad():  # random biases too (default init is already random but small)
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = case.scale * torch.randn(3, *case.shape, dtype=DT)
    net = mpbackprop.compile(model, x)
    return model, net, x


def close(a: torch.Tensor, b: torch.Tensor, atol: float = ATOL) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=0)


# -------------------------------------------------------------------------------- forward pass
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_module(case: Case) -> None:
    model, net, x = build(case)
    with torch.no_grad():
        ref = model(x)
        close(net.forward(x), ref)
        close(net.forward_graph(x), ref)
    assert net.output_shape == tuple(ref.shape[1:])
    assert net.dtype == DT


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_forward_matches_module_with_other_batch_and_seed(case: Case) -> None:
    """Compiled on one batch, run on a batch of another size and another draw of the weights."""
    model, net, _ = build(case, seed=1)
    x = case.scale * torch.randn(7, *case.shape, dtype=DT)
    with torch.no_grad():
        ref = model(x)
        close(net.forward_graph(x), ref)
        close(net.forward(x), ref)


# -------------------------------------------------------------------------------- layer table
def _module_output_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per-sample output shape of every Linear/Conv2d/AvgPool2d submodule, by module path."""
    shapes: dict[str, tuple[int, ...]] = {}
    handles = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d, nn.AvgPool2d)):
            handles.append(mod.register_forward_hook(
                lambda m, i, o, name=name: shapes.__setitem__(name, tuple(o.shape[1:]))))
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return shapes


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_block_structure_and_neuron_count(case: Case) -> None:
    model, net, x = build(case)
    layers = net.layers
    assert tuple(l.kind for l in layers) == case.kinds
    assert [l.index for l in layers] == list(range(len(layers)))
    assert layers[0].shape == case.shape
    # blocks tile the neuron ids in order
    offset = 0
    for l in layers:
        assert l.offset == offset and l.size == math.prod(l.shape)
        offset += l.size
        assert all(b < l.index for b in l.inputs)
        for b, view in zip(l.inputs, l.input_shapes):
            assert math.prod(view) == layers[b].size
    # each module block has the shape the module really produces
    shapes = _module_output_shapes(model, x)
    module_blocks = [l for l in layers if l.kind in ("linear", "conv2d") or l.name in shapes]
    assert {l.name for l in module_blocks} == set(shapes)
    for l in module_blocks:
        assert l.shape == shapes[l.name], l.name
    # fixed element-wise blocks have the size of what they read
    for l in layers:
        if l.kind in ("add", "scale", "act"):
            assert all(math.prod(s) == l.size for s in l.input_shapes)
    expected = math.prod(case.shape) + sum(math.prod(l.shape) for l in layers[1:])
    assert net.num_neurons == expected == net.graph.num_nodes("neuron")
    if case.neurons is not None:
        assert net.num_neurons == case.neurons
    for b, act in case.acts.items():
        assert layers[b].activation == act, (b, layers[b].activation)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_param_nodes_map_back_to_module(case: Case) -> None:
    model, net, _ = build(case)
    g = net.graph
    named = dict(model.named_parameters())
    assert net.num_params == sum(p.numel() for p in model.parameters()) == g.num_nodes("param")
    assert sorted(t.path for t in net.tensors) == sorted(named)
    # in definition order for every model of the table
    close(net.values, torch.nn.utils.parameters_to_vector(model.parameters()), atol=0)
    pd = g.nodes["param"].data
    tensors = net.tensors
    for node in range(net.num_params):
        t = tensors[int(pd["tensor"][node])]
        k = int(pd["index"][node])
        assert t.offset + k == node
        assert pd["value"][node] == named[t.path].detach().reshape(-1)[k]
        assert int(pd["role"][node]) == (t.role == "bias")
        assert t.role == t.name
    owner = {t.path: l for l in net.layers for t in l.params}
    for t in tensors:
        assert (pd["layer"][t.offset:t.stop] == owner[t.path].index).all()
        assert tuple(named[t.path].shape) == t.shape


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_neuron_features_follow_layers(case: Case) -> None:
    _, net, _ = build(case)
    nd = net.graph.nodes["neuron"].data
    for l in net.layers:
        sl = slice(l.offset, l.stop)
        assert (nd["layer"][sl] == l.index).all()
        assert torch.equal(nd["pos"][sl], torch.arange(l.size))
        assert (nd["act"][sl] == ACTIVATION_IDS[l.activation.name]).all()
        assert (nd["kind"][sl] == KINDS.index(l.kind)).all()
        # coord is the row-major (channel, row, column) of pos, -1 for missing axes
        coord = nd["coord"][sl]
        tail = l.shape[-3:]
        expect = torch.full((l.size, 3), -1, dtype=torch.int64)
        if tail:
            grid = torch.stack(torch.meshgrid(*[torch.arange(s) for s in tail], indexing="ij"), -1)
            expect[:, 3 - len(tail):] = grid.reshape(l.size, len(tail))
        assert torch.equal(coord, expect)


# ---------------------------------------------------------------------------- module exchange
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_write_to_read_from_round_trip(case: Case) -> None:
    model, net, x = build(case, fresh=True)
    theta = net.values + 0.3 * torch.randn(net.num_params, dtype=DT)
    other = copy.deepcopy(model)
    net.write_to(other, theta)
    with torch.no_grad():
        out = other(x)
        close(net.forward(x, theta), out)
        close(net.forward_graph(x, theta), out)
        close(model(x), net.forward(x))  # the original module and the graph's values are untouched
    back = net.read_from(other)
    assert torch.equal(back, theta)
    assert torch.equal(net.values, theta)
    with torch.no_grad():
        close(net.forward_graph(x), out)


# --------------------------------------------------------------------------------- refusals
class _Ctrl(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # CONTROL-FLOW-LINE
            return self.fc(x)
        return x


class _Product(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) * self.b(x)


class _AddConst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(x) + 1.0


class _RawParam(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return F.linear(x, self.w)


class _TwoInputs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x, y):
        return self.a(x) + y


class _Sort(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return torch.sort(self.a(x), dim=1).values


class _LSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(4, 4, batch_first=True)

    def forward(self, x):
        return self.rnn(x)[0]


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x)[0]


class _CalledTwice(nn.Module):
    """One Linear applied twice: its weights would need two param nodes each."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x):
        return self.a(torch.relu(self.a(x)))


HERE = os.path.basename(__file__)

# (id, module factory, input shape, words the message must contain)
REFUSALS = [
    ("groupnorm", lambda: nn.Sequential(nn.Linear(4, 4), nn.GroupNorm(2, 4)), (4,), ["GroupNorm", "'1'"]),
    ("batchnorm3d", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm3d(2)), (1, 8, 8), ["BatchNorm3d", "'1'"]),
    ("maxpool-ceil", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.MaxPool2d(2, ceil_mode=True)), (1, 8, 8),
     ["MaxPool2d", "ceil_mode", "'1'"]),
    ("lstm", _LSTM, (3, 4), ["LSTM", "'rnn'"]),
    ("attention", _Attention, (3, 4), ["MultiheadAttention", "'attn'"]),
    ("sort", _Sort, (4,), ["sort"]),
    ("groups", lambda: nn.Sequential(nn.Conv2d(2, 2, 3, groups=2)), (2, 8, 8), ["Conv2d", "groups=2", "'0'"]),
    ("reflect", lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect")), (1, 8, 8),
     ["Conv2d", "reflect", "'0'"]),
    ("ceil-mode", lambda: nn.Sequential(nn.AvgPool2d(2, ceil_mode=True)), (1, 7, 7),
     ["AvgPool2d", "ceil_mode", "'0'"]),
    ("product", _Product, (4,), ["mul", "product"]),
    ("add-constant", _AddConst, (4,), ["add", "constant"]),
    ("raw-parameter", _RawParam, (4,), ["'w'"]),
    ("two-inputs", _TwoInputs, (4,), ["2", "one input"]),
    ("called-twice", _CalledTwice, (4,), ["'a'", "more than once"]),
]


def _line_of(cls: type, marker: str) -> int:
    lines, start = inspect.getsourcelines(cls)
    return start + next(k for k, line in enumerate(lines) if marker in line)


@pytest.mark.parametrize("make, shape, words", [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_unsupported_ops_are_refused_with_op_and_location(make, shape, words) -> None:
    torch.manual_seed(0)
    with pytest.raises(UnsupportedOpError) as err:
        mpbackprop.compile(make(), shape)
    msg = str(err.value)
    for w in words:
        assert w in msg, (w, msg)
    assert "\n" not in msg
    if isinstance(make, type) and make is not _TwoInputs:
        assert f"{HERE}:" in msg, msg  # file:line of the offending code in the hand-written forward
    elif not isinstance(make, type):
        # layers of an nn.Sequential have no line of their own: the module path locates them,
        # and the line of whoever called compile() must not be passed off as the location
        assert f"{HERE}:" not in msg, msg


def test_control_flow_is_refused_with_file_and_line() -> None:
    with pytest.raises(UnsupportedOpError) as err:
        mpbackprop.compile(_Ctrl(), (4,))
    msg = str(err.value)
    assert "control flow" in msg
    assert f"{HERE}:{_line_of(_Ctrl, 'CONTROL-FLOW-LINE')}" in msg, msg


def test_location_found_when_user_code_lives_under_a_directory_named_mpbackprop(tmp_path) -> None:
    """Frames are told apart by real package directories, not by a path containing 'mpbackprop'."""
    src = tmp_path / "mpbackprop" / "torch" / "user_model.py"
    src.parent.mkdir(parents=True)
    src.write_text(
        "import torch.nn as nn\n"
        "class M(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(3, 3)\n"
        "    def forward(self, x):\n"
        "        if x.mean() > 0:\n"
        "            return self.fc(x)\n"
        "        return x\n"
        "class N(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = nn.Linear(3, 3)\n"
        "        self.bn = nn.GroupNorm(1, 3)\n"
        "    def forward(self, x):\n"
        "        return self.bn(self.fc(x))\n"
    )
    spec = importlib.util.spec_from_file_location("user_model_under_mpbackprop", src)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(UnsupportedOpError, match=r"user_model\.py:7"):
        mpbackprop.compile(mod.M(), (3,))
    with pytest.raises(UnsupportedOpError, match=r"user_model\.py:16"):
        mpbackprop.compile(mod.N(), (3,))


@pytest.mark.parametrize("make, shape", [
    (lambda: nn.Sequential(nn.Linear(4, 3)), (5,)),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3)), (2, 8, 8)),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3)), (8, 8)),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(10, 2)), (1, 8, 8)),
    (lambda: nn.Sequential(nn.Conv2d(1, 2, 5)), (1, 3, 3)),
    (lambda: nn.Sequential(nn.Linear(4, 3)), (0, 4)),
], ids=["linear-features", "conv-channels", "conv-rank", "flatten-size", "conv-too-small", "empty-dim"])
def test_wrong_input_shape_raises_shape_error(make, shape) -> None:
    with pytest.raises(ShapeError) as err:
        mpbackprop.compile(make(), shape)
    assert "\n" not in str(err.value), str(err.value)


def test_compiled_network_rejects_wrong_batch_shape() -> None:
    net = mpbackprop.compile(nn.Sequential(nn.Linear(4, 3)).double(), (4,))
    for bad in (torch.zeros(2, 5, dtype=DT), torch.zeros(4, dtype=DT), torch.zeros(2, 1, 4, dtype=DT)):
        with pytest.raises(ShapeError):
            net.forward(bad)
        with pytest.raises(ShapeError):
            net.forward_graph(bad)


def test_error_classes_share_the_library_base() -> None:
    for cls in (UnsupportedOpError, ShapeError, mpbackprop.GraphFileError):
        assert issubclass(cls, mpbackprop.MPBackpropError)


# ------------------------------------------------------------------------------- activations
DERIVATIVE_CASES = [
    (Activation("identity"), nn.Identity()),
    (Activation("relu"), nn.ReLU()),
    (Activation("leaky_relu", {"negative_slope": 0.01}), nn.LeakyReLU()),
    (Activation("leaky_relu", {"negative_slope": 0.2}), nn.LeakyReLU(0.2)),
    (Activation("elu", {"alpha": 1.0}), nn.ELU()),
    (Activation("elu", {"alpha": 0.5}), nn.ELU(0.5)),
    (Activation("gelu", {"approximate": "none"}), nn.GELU()),
    (Activation("gelu", {"approximate": "tanh"}), nn.GELU(approximate="tanh")),
    (Activation("silu"), nn.SiLU()),
    (Activation("tanh"), nn.Tanh()),
    (Activation("sigmoid"), nn.Sigmoid()),
    (Activation("softplus", {"beta": 1.0, "threshold": 20.0}), nn.Softplus()),
    (Activation("softplus", {"beta": 2.0, "threshold": 3.0}), nn.Softplus(beta=2.0, threshold=3.0)),
    (Activation("softplus", {"beta": 0.5, "threshold": 10.0}), nn.Softplus(beta=0.5, threshold=10.0)),
]


def _z_grid() -> torch.Tensor:
    eps = torch.tensor([0.0, 1e-300, 1e-12, 1e-8, 1e-4, 1e-2, 0.5], dtype=DT)
    kinks = torch.tensor([0.0, 1.5, 3.0, 5.0, 10.0, 20.0, 40.0], dtype=DT)  # 0 and softplus thresholds/beta
    near = (kinks[:, None] + torch.cat([eps, -eps])[None, :]).reshape(-1)
    return torch.cat([torch.linspace(-60, 60, 2401, dtype=DT), near, -near, torch.tensor([-700.0, 700.0], dtype=DT)])


@pytest.mark.parametrize("act, ref", DERIVATIVE_CASES, ids=[str(a) for a, _ in DERIVATIVE_CASES])
def test_activation_closed_form_matches_torch_and_autograd(act: Activation, ref: nn.Module) -> None:
    z = _z_grid().requires_grad_(True)
    out = ref(z)
    (grad,) = torch.autograd.grad(out.sum(), z)
    with torch.no_grad():
        close(act(z), out, atol=1e-12)
        close(act.derivative(z), grad, atol=1e-12)
    assert Activation.from_json(act.to_json()) == act


# ------------------------------------------------------------------------------------ import
def test_import_prints_no_dgl_banner() -> None:
    env = {k: v for k, v in os.environ.items() if k != "DGLBACKEND"}
    proc = subprocess.run([sys.executable, "-c", "import mpbackprop"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == ""
