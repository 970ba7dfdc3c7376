"""A LeNet-style convnet on 1x8x8 images (scikit-learn digits): Conv2d, BatchNorm2d, MaxPool2d,
global average pooling and Dropout."""

import torch
import torch.nn as nn

INPUT_SHAPE = (1, 8, 8)


class LeNet(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 12, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(12)
        self.drop = nn.Dropout(0.1)
        self.fc = nn.Linear(12, classes)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn1(self.conv1(x))))   # (6, 4, 4)
        h = torch.relu(self.bn2(self.conv2(h)))              # (12, 4, 4)
        h = h.mean((2, 3))                                   # global average pooling: (12,)
        return self.fc(self.drop(h))


model = LeNet()
