"""Refused: MaxPool2d with ceil_mode=True (windows that hang over the edge); ceil_mode=False compiles."""

import torch.nn as nn

INPUT_SHAPE = (1, 8, 8)

model = nn.Sequential(
    nn.Conv2d(1, 2, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2, ceil_mode=True),
    nn.Flatten(),
    nn.Linear(32, 4),
)
