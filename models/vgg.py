"""VGG-19 for CIFAR-10 as in the release: no batch norm, 3-layer classifier (`classifier.0/3/6`)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ._checks import check_flat_features

VGG19_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M",
)  # fmt: skip


class VGG(nn.Module):
    """`features`: conv3x3 (padding 1, bias) + ReLU per number, 2x2 max pool per "M", then AvgPool2d(1, 1);
    `classifier`: Linear(512, 512), ReLU, Dropout, Linear(512, 512), ReLU, Dropout, Linear(512, num_classes).

    x: [B, in_channels, 32, 32] normalised (the five pools must reach 1x1); returns logits [B, num_classes].
    """

    def __init__(self, config: tuple[int | str, ...] = VGG19_CONFIG, in_channels: int = 3, num_classes: int = 10):
        super().__init__()
        self.features = _make_features(config, in_channels)
        self.classifier = nn.Sequential(
            nn.Linear(512, 512),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(512, 512),
            nn.ReLU(True),
            nn.Dropout(),
            nn.Linear(512, num_classes),
        )
        for m in self.modules():  # the release's He-normal init of the convolutions
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.features(x).flatten(1)
        check_flat_features(out, self.classifier[0], "vgg19", "32x32")
        return self.classifier(out)


def _make_features(config: tuple[int | str, ...], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = in_channels
    for item in config:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = int(item)
    layers.append(nn.AvgPool2d(kernel_size=1, stride=1))
    return nn.Sequential(*layers)


def vgg19(in_channels: int = 3, num_classes: int = 10) -> VGG:
    return VGG(VGG19_CONFIG, in_channels=in_channels, num_classes=num_classes)
