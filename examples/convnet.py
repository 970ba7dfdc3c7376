"""A small convolutional network on 1x8x8 images (448 parameters, 338 neurons).

Conv2d(1->3, 3x3, padding 1) -> ReLU -> AvgPool2d(2) -> Conv2d(3->6, 3x3, stride 2, padding 1)
-> ReLU -> flatten -> Linear(24->10), with a hand-written ``forward`` in functional style.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

INPUT_SHAPE = (1, 8, 8)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, kernel_size=3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.conv2 = nn.Conv2d(3, 6, kernel_size=3, stride=2, padding=1)
        self.fc = nn.Linear(6 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(torch.flatten(x, 1))


model = ConvNet()
