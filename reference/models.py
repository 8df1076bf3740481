"""ResNet-18, CIFAR variant (the paper, Sec. 4.1), with an adjustable base width.

The paper's model: 3x3 stem convolution with stride 1 and padding 1, no max-pooling, four
stages of two BasicBlocks with 64, 128, 256, 512 channels, global average pooling, fc 512 -> 10.
The CPU presets keep this topology and the seven top-level parameter groups the diagnostics
work on - ``conv1, bn1, layer1, layer2, layer3, layer4, fc`` - but use a smaller base width
(channels ``w, 2w, 4w, 8w``). ``width=64`` is the paper's 11.2M-parameter model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LAYER_GROUPS = ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (He et al., 2016)."""

    def __init__(self, in_channels: int, channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for small images: 3x3 stem, no max-pool, base width ``width``."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        channels = width
        stages = []
        for i, stride in enumerate((1, 2, 2, 2)):
            out_channels = width * 2**i
            stages.append(
                nn.Sequential(
                    BasicBlock(channels, out_channels, stride),
                    BasicBlock(out_channels, out_channels, 1),
                )
            )
            channels = out_channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def build_model(in_channels: int, num_classes: int, width: int, channels_last: bool) -> nn.Module:
    model = ResNet18(in_channels, num_classes, width)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model
