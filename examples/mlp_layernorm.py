"""An MLP with LayerNorm after each hidden layer (pre-activation), on 64 inputs."""

import torch.nn as nn

INPUT_SHAPE = (64,)

model = nn.Sequential(
    nn.Linear(64, 32), nn.LayerNorm(32), nn.GELU(),
    nn.Linear(32, 32), nn.LayerNorm(32), nn.GELU(),
    nn.Linear(32, 10),
)
