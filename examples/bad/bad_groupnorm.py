"""Refused: BatchNorm1d mixes samples of a batch, which a per-sample graph cannot express."""

import torch.nn as nn

INPUT_SHAPE = (8,)

model = nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2))
