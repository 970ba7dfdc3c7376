"""A residual MLP: ``h + 0.5 * f(h)`` blocks on a 16-wide stream (1,364 parameters)."""

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (12,)


class ResidualBlock(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + 0.5 * self.fc2(torch.tanh(self.fc1(h)))


class ResMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(12, 16)
        self.blocks = nn.Sequential(ResidualBlock(16, 16), ResidualBlock(16, 16))
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.stem(x))
        return self.head(self.blocks(h))


def build_model() -> nn.Module:
    return ResMLP()
