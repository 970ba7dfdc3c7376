"""A tiny 16-16-8-4 MLP with tanh activations."""

import torch.nn as nn

INPUT_SHAPE = (16,)


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 16),
        nn.Tanh(),
        nn.Linear(16, 8),
        nn.Tanh(),
        nn.Linear(8, 4),
    )
