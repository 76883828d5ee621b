"""DenseNet-121 for CIFAR-10 as in the release: growth 32, blocks [6, 12, 24, 16], reduction 0.5."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_flat_features


class Bottleneck(nn.Module):
    """BN-ReLU-conv1x1 (4*growth) then BN-ReLU-conv3x3 (growth); output `cat([new, x])` (new channels first)."""

    def __init__(self, in_planes: int, growth_rate: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth_rate, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth_rate)
        self.conv2 = nn.Conv2d(4 * growth_rate, growth_rate, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class Transition(nn.Module):
    """BN-ReLU-conv1x1 then 2x2 average pool."""

    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """Stem conv3x3 (2*growth channels), `dense1..4` with `trans1..3` between them, final `bn`, ReLU,
    4x4 average pool, `linear`.

    x: [B, in_channels, 32, 32] normalised; returns logits [B, num_classes].
    """

    def __init__(
        self,
        num_blocks: list[int],
        growth_rate: int = 32,
        reduction: float = 0.5,
        in_channels: int = 3,
        num_classes: int = 10,
    ):
        super().__init__()
        self.growth_rate = growth_rate
        planes = 2 * growth_rate
        self.conv1 = nn.Conv2d(in_channels, planes, kernel_size=3, padding=1, bias=False)
        for i, n in enumerate(num_blocks, start=1):
            setattr(self, f"dense{i}", self._make_dense(planes, n))
            planes += n * growth_rate
            if i < len(num_blocks):
                out_planes = int(math.floor(planes * reduction))
                setattr(self, f"trans{i}", Transition(planes, out_planes))
                planes = out_planes
        self.num_stages = len(num_blocks)
        self.bn = nn.BatchNorm2d(planes)
        self.linear = nn.Linear(planes, num_classes)

    def _make_dense(self, in_planes: int, num_blocks: int) -> nn.Sequential:
        return nn.Sequential(
            *[Bottleneck(in_planes + i * self.growth_rate, self.growth_rate) for i in range(num_blocks)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        for i in range(1, self.num_stages + 1):
            out = getattr(self, f"dense{i}")(out)
            if i < self.num_stages:
                out = getattr(self, f"trans{i}")(out)
        out = F.avg_pool2d(F.relu(self.bn(out)), 4).flatten(1)
        check_flat_features(out, self.linear, "densenet121", "32x32")
        return self.linear(out)


def densenet121(in_channels: int = 3, num_classes: int = 10) -> DenseNet:
    return DenseNet([6, 12, 24, 16], growth_rate=32, in_channels=in_channels, num_classes=num_classes)
