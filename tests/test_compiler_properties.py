"""Property tests: random layer stacks must compile, count the right nodes, reproduce the forward
pass on both paths in float64, and survive save/load.

Expected node counts come from the drawn spec alone (widths, kernel arithmetic), never from
the compiler's metadata.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mpbackprop

DT = torch.float64
ATOL = 1e-10
SETTINGS = settings(max_examples=int(os.environ.get("MPBACKPROP_HYPOTHESIS_EXAMPLES", 25)), deadline=None,
                    database=None, suppress_health_check=[HealthCheck.too_slow])

ACTS = {
    "relu": nn.ReLU,
    "leaky_relu": lambda: nn.LeakyReLU(0.15),
    "elu": lambda: nn.ELU(0.8),
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "softplus": lambda: nn.Softplus(beta=1.5, threshold=2.0),
    "identity": nn.Identity,
}
act_names = st.sampled_from(sorted(ACTS))


# ----------------------------------------------------------------------------------------- MLPs
@dataclass
class MLPSpec:
    n_in: int
    widths: list[int]
    acts: list[str]
    residual: list[str]  # per layer: "none", "pre" (h + f(fc(h))) or "post" (f(fc(h) + h))
    bias: list[bool]


@st.composite
def mlp_specs(draw) -> MLPSpec:
    n_in = draw(st.integers(1, 12))
    depth = draw(st.integers(1, 4))
    widths, acts, residual, bias = [], [], [], []
    prev = n_in
    for _ in range(depth):
        # widths that repeat the previous one make residual connections possible
        w = draw(st.one_of(st.just(prev), st.integers(1, 12)))
        widths.append(w)
        acts.append(draw(act_names))
        residual.append(draw(st.sampled_from(["none", "pre", "post"])) if w == prev else "none")
        bias.append(draw(st.booleans()))
        prev = w
    return MLPSpec(n_in, widths, acts, residual, bias)


class RandomMLP(nn.Module):
    def __init__(self, spec: MLPSpec) -> None:
        super().__init__()
        self.residual = list(spec.residual)
        dims = [spec.n_in] + spec.widths
        self.fcs = nn.ModuleList(nn.Linear(a, b, bias=bias) for a, b, bias in zip(dims, dims[1:], spec.bias))
        self.acts = nn.ModuleList(ACTS[a]() for a in spec.acts)

    def forward(self, x):
        for fc, act, res in zip(self.fcs, self.acts, self.residual):
            if res == "pre":
                x = x + act(fc(x))
            elif res == "post":
                x = act(fc(x) + x)
            else:
                x = act(fc(x))
        return x


def _mlp_expected(spec: MLPSpec) -> tuple[int, int]:
    neurons = spec.n_in
    params = 0
    prev = spec.n_in
    for w, res, b in zip(spec.widths, spec.residual, spec.bias):
        neurons += w * (2 if res != "none" else 1)  # a residual add is a block of its own
        params += prev * w + (w if b else 0)
        prev = w
    return neurons, params


# ------------------------------------------------------------------------------------- convnets
@dataclass
class ConvSpec:
    shape: tuple[int, int, int]
    convs: list[tuple[int, int, int, int]]  # (c_out, kernel, stride, padding)
    acts: list[str]
    pool: bool
    n_out: int


@st.composite
def conv_specs(draw) -> ConvSpec:
    shape = (draw(st.integers(1, 2)), draw(st.integers(3, 8)), draw(st.integers(3, 8)))
    _, h, w = shape
    convs, acts = [], []
    for _ in range(draw(st.integers(1, 2))):
        pad = draw(st.integers(0, 1))
        k = min(draw(st.integers(1, 3)), h + 2 * pad, w + 2 * pad)  # the kernel must fit
        s = draw(st.integers(1, 2))
        convs.append((draw(st.integers(1, 3)), k, s, pad))
        acts.append(draw(act_names))
        h, w = (h + 2 * pad - k) // s + 1, (w + 2 * pad - k) // s + 1
    pool = draw(st.booleans()) and h >= 2 and w >= 2
    return ConvSpec(shape, convs, acts, pool, draw(st.integers(1, 5)))


def _conv_sizes(spec: ConvSpec) -> list[tuple[int, int, int]]:
    """Per-sample shape of each block after the input, by the convolution arithmetic."""
    c, h, w = spec.shape
    out = []
    for c_out, k, s, p in spec.convs:
        h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
        c = c_out
        out.append((c, h, w))
    if spec.pool:
        out.append((c, h // 2, w // 2))
    return out


def _build_conv(spec: ConvSpec) -> nn.Module:
    layers: list[nn.Module] = []
    c = spec.shape[0]
    for (c_out, k, s, p), act in zip(spec.convs, spec.acts):
        layers += [nn.Conv2d(c, c_out, k, stride=s, padding=p), ACTS[act]()]
        c = c_out
    if spec.pool:
        layers.append(nn.AvgPool2d(2))
    flat = math.prod(_conv_sizes(spec)[-1])
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(flat, spec.n_out))


def _conv_expected(spec: ConvSpec) -> tuple[int, int]:
    sizes = _conv_sizes(spec)
    neurons = math.prod(spec.shape) + sum(math.prod(s) for s in sizes) + spec.n_out
    params = 0
    c = spec.shape[0]
    for c_out, k, _, _ in spec.convs:
        params += c_out * c * k * k + c_out
        c = c_out
    params += math.prod(sizes[-1]) * spec.n_out + spec.n_out
    return neurons, params


# ------------------------------------------------------------------------------------- checks
def _check(model: nn.Module, shape: tuple[int, ...], neurons: int, params: int, seed: int) -> None:
    torch.manual_seed(seed)
    model = model.to(DT)
    x = 2.0 * torch.randn(4, *shape, dtype=DT)
    net = mpbackprop.compile(model, x)
    assert net.num_neurons == neurons
    assert net.num_params == params == sum(p.numel() for p in model.parameters())
    assert torch.equal(net.values, torch.nn.utils.parameters_to_vector(model.parameters()))
    with torch.no_grad():
        ref = model(x)
        torch.testing.assert_close(net.forward(x), ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(net.forward_graph(x), ref, atol=ATOL, rtol=0)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = mpbackprop.load(net.save(Path(tmp) / "net.bin"))
    assert loaded.layers == net.layers
    assert loaded.graph.canonical_etypes == net.graph.canonical_etypes
    for nt in ("neuron", "param"):
        for k, v in net.graph.nodes[nt].data.items():
            assert torch.equal(loaded.graph.nodes[nt].data[k], v), (nt, k)
    with torch.no_grad():
        torch.testing.assert_close(loaded.forward_graph(x), ref, atol=ATOL, rtol=0)


@SETTINGS
@given(spec=mlp_specs(), seed=st.integers(0, 2**16))
def test_random_mlp_stacks(spec: MLPSpec, seed: int) -> None:
    torch.manual_seed(seed)
    neurons, params = _mlp_expected(spec)
    _check(RandomMLP(spec), (spec.n_in,), neurons, params, seed)


@SETTINGS
@given(spec=conv_specs(), seed=st.integers(0, 2**16))
def test_random_conv_stacks(spec: ConvSpec, seed: int) -> None:
    torch.manual_seed(seed)
    neurons, params = _conv_expected(spec)
    _check(_build_conv(spec), spec.shape, neurons, params, seed)
