"""LayerNorm: normalization edges within each row plus an affine block whose gain and shift are param
nodes; exact against autograd (tests/kindcheck.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mpbackprop as mp
from kindcheck import check_kind, seq


class _Rows(nn.Module):
    """LayerNorm over the last axis of a (rows, features) sample, then a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.ln = nn.LayerNorm(6, eps=1e-3)
        self.out = nn.Linear(18, 3)

    def forward(self, x):
        h = self.fc(x)
        h = h + torch.relu(self.ln(h))
        return self.out(h.flatten(1))


CASES = {
    "mlp": (seq(nn.Linear(5, 7), nn.LayerNorm(7), nn.GELU(), nn.Linear(7, 4)), (5,)),
    "rows-residual": (_Rows, (3, 4)),
    "no-affine-2d": (seq(nn.Conv2d(1, 2, 2), nn.LayerNorm([3, 3], elementwise_affine=False), nn.Tanh(),
                         nn.Flatten(), nn.Linear(18, 3)), (1, 4, 4)),
    "conv-chw": (seq(nn.Conv2d(1, 2, 2), nn.LayerNorm([2, 3, 3]), nn.Flatten(), nn.Linear(18, 3)), (1, 4, 4)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_layernorm_is_exact(name, tmp_path) -> None:
    make, shape = CASES[name]
    errors = check_kind(make, shape, "layernorm", tmp_path)
    assert errors["float64"] <= 1e-10 and errors["float32"] <= 1e-4


def test_gain_and_shift_are_param_nodes() -> None:
    torch.manual_seed(0)
    net = mp.compile(nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)), (3,))
    kinds = [layer.kind for layer in net.layers]
    assert kinds == ["input", "linear", "layernorm", "affine", "linear"]
    affine = net.layers[3]
    assert (affine.weight.path, affine.bias.path) == ("1.weight", "1.bias")
    assert net.graph.num_edges("fixed_2") == 16 and net.graph.num_edges("in_3") == 4
