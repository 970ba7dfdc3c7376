"""A tiny 16-16-8-4 MLP with LeakyReLU (negative slope 0.1) activations."""

import torch.nn as nn

INPUT_SHAPE = (16,)


def build_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(16, 16),
        nn.LeakyReLU(0.1),
        nn.Linear(16, 8),
        nn.LeakyReLU(0.1),
        nn.Linear(8, 4),
    )
