"""A tiny 16-16-8-4 MLP with GELU (tanh approximation) activations."""

import torch.nn as nn

INPUT_SHAPE = (16,)


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 16),
        nn.GELU(approximate="tanh"),
        nn.Linear(16, 8),
        nn.GELU(approximate="tanh"),
        nn.Linear(8, 4),
    )
