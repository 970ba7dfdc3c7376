"""BatchNorm1d/2d in training mode: normalization edges within each channel whose messages carry batch
means (the batch coupling), plus an affine block; exact against autograd (tests/kindcheck.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import mpbackprop as mp
from kindcheck import check_kind, seq

class _Length(nn.Module):
    """BatchNorm1d over (channels, length) samples, without affine parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(2, affine=False)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.fc(x).reshape(-1, 2, 3))).flatten(1))


CASES = {
    "mlp-1d": (seq(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)), (5,)),
    "conv-2d": (seq(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3, eps=1e-3), nn.Tanh(), nn.AvgPool2d(2),
                    nn.Flatten(), nn.Linear(12, 4)), (1, 4, 4)),
    "1d-length-no-affine": (lambda: _Length(), (4,)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_batchnorm_is_exact(name, tmp_path) -> None:
    make, shape = CASES[name]
    errors = check_kind(make, shape, "batchnorm", tmp_path)
    assert errors["float64"] <= 1e-10 and errors["float32"] <= 1e-4


def test_eval_mode_module_compiles_with_batch_statistics_and_flags_are_restored() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    net = mp.compile(model, (3,))
    assert not model[1].training
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # running stats untouched
    x = torch.randn(6, 3)
    model[1].train()
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x))


def test_messages_couple_the_samples() -> None:
    """Changing one sample's output gradient changes the other samples' messages (not so without BN)."""
    from mpbackprop.engine import backward, forward_and_seed
    from mpbackprop.engine import resolve_loss
    from mpbackprop.rules import Exact

    torch.manual_seed(0)
    net = mp.compile(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double(), (3,))
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    record, _, dl = forward_and_seed(net, net.values, x, y, resolve_loss("cross_entropy"))
    first = backward(net, record, dl, Exact(), {}, net.values).messages[1]
    dl2 = dl.clone()
    dl2[0] += 1.0
    second = backward(net, record, dl2, Exact(), {}, net.values).messages[1]
    assert (first[..., 1:] - second[..., 1:]).abs().max() > 1e-3
