"""Refused: this file is not valid Python (a missing closing parenthesis)."""

import torch.nn as nn

INPUT_SHAPE = (8,)

model = nn.Sequential(nn.Linear(8, 4), nn.ReLU()

print("never reached")
