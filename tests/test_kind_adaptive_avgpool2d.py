"""AdaptiveAvgPool2d and global average pooling: fixed window edges, exact against autograd."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from mpbackprop.errors import UnsupportedOpError
import mpbackprop as mp
from kindcheck import check_kind, seq


class _GlobalMean(nn.Module):
    def __init__(self, keepdim: bool) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)
        self.keepdim = keepdim

    def forward(self, x):
        h = torch.relu(self.c(x)).mean(dim=(-2, -1), keepdim=self.keepdim)
        return self.fc(h.flatten(1))


class _Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(2, 3, 2)
        self.fc = nn.Linear(3 * 2 * 3, 2)

    def forward(self, x):
        return self.fc(F.adaptive_avg_pool2d(torch.tanh(self.c(x)), (2, 3)).flatten(1))


CASES = {
    "module-uneven": (seq(nn.Conv2d(1, 2, 2), nn.AdaptiveAvgPool2d((3, None)), nn.Flatten(), nn.Linear(2 * 3 * 6, 4)),
                      (1, 8, 7)),
    "global-1": (seq(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2)), (1, 6, 6)),
    "mean": (lambda: _GlobalMean(False), (1, 5, 5)),
    "mean-keepdim": (lambda: _GlobalMean(True), (1, 5, 5)),
    "functional": (_Functional, (2, 6, 5)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_adaptive_avgpool_is_exact(name, tmp_path) -> None:
    make, shape = CASES[name]
    errors = check_kind(make, shape, "adaptive_avgpool2d", tmp_path)
    assert errors["float64"] <= 1e-10 and errors["float32"] <= 1e-4


class _MeanOverChannels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 2, 1)

    def forward(self, x):
        return self.c(x).mean(1).flatten(1)


def test_mean_over_other_axes_is_refused() -> None:
    with pytest.raises(UnsupportedOpError, match="mean.*spatial"):
        mp.compile(_MeanOverChannels(), (1, 3, 3))
