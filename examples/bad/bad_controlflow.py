"""Refused: Python branching on tensor values cannot be traced into a fixed graph."""

import torch
import torch.nn as nn

INPUT_SHAPE = (8,)


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if h.sum() > 0:
            h = torch.relu(h)
        return self.fc2(h)


model = Branchy()
