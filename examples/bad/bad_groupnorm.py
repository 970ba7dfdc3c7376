"""Refused: GroupNorm is not a supported layer (BatchNorm and LayerNorm are)."""

import torch.nn as nn

INPUT_SHAPE = (8,)

model = nn.Sequential(nn.Linear(8, 8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, 2))
