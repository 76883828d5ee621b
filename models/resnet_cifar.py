"""ResNet-18 for CIFAR-10 as in the release: 3x3 stem, basic blocks with `shortcut` Sequential, `linear` head."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_flat_features


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers plus an identity shortcut, or `shortcut.0` 1x1 conv / `shortcut.1` BN
    when the stride or the channel count changes."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetCIFAR(nn.Module):
    """Stem conv3x3(64)-BN-ReLU, `layer1..4` (64, 128, 256, 512 channels; strides 1, 2, 2, 2),
    4x4 average pool, `linear` head.

    x: [B, in_channels, 32, 32] normalised (sides 25..32 also pool to 1x1); returns logits [B, num_classes].
    """

    def __init__(self, num_blocks: list[int], in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        self.linear = nn.Linear(512 * BasicBlock.expansion, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(BasicBlock(self.in_planes, planes, s))
            self.in_planes = planes * BasicBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.avg_pool2d(out, 4).flatten(1)
        check_flat_features(out, self.linear, "resnet18 (CIFAR)", "32x32")
        return self.linear(out)


def resnet18_cifar(in_channels: int = 3, num_classes: int = 10) -> ResNetCIFAR:
    return ResNetCIFAR([2, 2, 2, 2], in_channels=in_channels, num_classes=num_classes)
