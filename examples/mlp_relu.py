"""A 64-32-10 ReLU MLP (2,410 parameters): the smallest classifier worth compiling."""

import torch.nn as nn

INPUT_SHAPE = (64,)

model = nn.Sequential(
    nn.Linear(64, 32),
    nn.ReLU(),
    nn.Linear(32, 10),
)
