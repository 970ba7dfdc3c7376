"""MaxPool2d: per-sample gates on fixed window edges, exact against autograd (tests/kindcheck.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import mpbackprop as mp
from mpbackprop.errors import UnsupportedOpError
from kindcheck import check_kind, seq


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        h = F.max_pool2d(torch.tanh(self.c(x)), 3, stride=2, padding=1, dilation=1)
        return self.fc(h.flatten(1))


CASES = {
    "plain": (seq(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(48, 5)), (1, 8, 8)),
    "strided-padded-dilated": (seq(nn.Conv2d(2, 2, 2), nn.MaxPool2d((3, 2), stride=(1, 2), padding=1, dilation=(2, 1)),
                                   nn.Flatten(), nn.Linear(2 * 4 * 4, 3)), (2, 7, 7)),
    "functional": (_Functional, (2, 6, 6)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_maxpool_is_exact(name, tmp_path) -> None:
    make, shape = CASES[name]
    errors = check_kind(make, shape, "maxpool2d", tmp_path)
    assert errors["float64"] <= 1e-10 and errors["float32"] <= 1e-4


def test_ties_break_as_autograd() -> None:
    """A constant window: autograd routes the whole gradient to its first element; so must the gates."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[0].weight.fill_(-1.0)  # every input >= 0 maps to <= 0: ReLU makes whole windows tie at 0
        model[0].bias.fill_(0.0)
    net = mp.compile(model, (1, 4, 4))
    x = torch.rand(3, 1, 4, 4, dtype=torch.float64)
    x[0, 0, :2, :2] = -1.0  # one window of one sample ties at a positive value
    y = torch.tensor([0, 1, 2])
    from mpbackprop.engine import signals
    from mpbackprop.rules import Exact

    params = list(model.parameters())
    want = torch.cat([g.reshape(-1) for g in torch.autograd.grad(F.cross_entropy(model(x), y), params)])
    for fused in (True, False):
        got, _ = signals(net, x, y, Exact(), fused=fused)
        torch.testing.assert_close(got[:, 0], want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("layer, words", [
    (nn.MaxPool2d(2, ceil_mode=True), ["MaxPool2d", "ceil_mode"]),
    (nn.MaxPool2d(2, return_indices=True), ["MaxPool2d", "return_indices"]),
])
def test_refused_options(layer, words) -> None:
    with pytest.raises(UnsupportedOpError) as err:
        mp.compile(nn.Sequential(nn.Conv2d(1, 1, 1), layer), (1, 5, 5))
    assert all(w in str(err.value) for w in words), str(err.value)
