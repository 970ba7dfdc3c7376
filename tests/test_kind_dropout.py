"""Dropout: identity edges carrying the sample's mask; the identity without a generator (eval), the
module's own mask with one (tests/kindcheck.py, and against autograd with masks drawn alike)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpbackprop as mp
from mpbackprop.engine import backward
from mpbackprop.errors import UnsupportedOpError
from mpbackprop.rules import Exact
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
