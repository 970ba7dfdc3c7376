"""Refused: MaxPool2d routes gradients through a data-dependent argmax."""

import torch.nn as nn

INPUT_SHAPE = (1, 8, 8)

model = nn.Sequential(
    nn.Conv2d(1, 2, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Flatten(),
    nn.Linear(32, 4),
)
