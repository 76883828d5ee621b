"""LeNet of the release (MNIST), parameter names `conv1, conv2, fc1, fc2, fc3`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._checks import check_flat_features


def lenet_feature_side(size: int) -> int:
    """Side of the feature map entering `fc1` for an input side `size` (pixels): conv5 pad 2, pool, conv5, pool."""
    return (size // 2 - 4) // 2


class LeNet(nn.Module):
    """conv(5, pad 2) -> ReLU -> maxpool 2 -> conv(5) -> ReLU -> maxpool 2 -> fc 120 -> fc 84 -> fc num_classes.

    `image_size` (int or (H, W), default 28) sets `fc1`'s inputs: 16*5*5 = 400 for 28x28, 16*6*6 = 576 for 32x32.
    x: [B, in_channels, H, W] normalised; returns logits [B, num_classes].
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, image_size: int | tuple[int, int] = 28):
        super().__init__()
        height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        fh, fw = lenet_feature_side(height), lenet_feature_side(width)
        if fh < 1 or fw < 1:
            raise ValueError(f"LeNet needs images of at least 12x12 pixels, got image_size={height}x{width}")
        self.image_size = (height, width)
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * fh * fw, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(self.conv1(x)), 2)
        out = F.max_pool2d(F.relu(self.conv2(out)), 2)
        out = out.flatten(1)
        check_flat_features(
            out, self.fc1, "lenet", f"{self.image_size[0]}x{self.image_size[1]} (build it with image_size=H)"
        )
        out = F.relu(self.fc1(out))
        out = F.relu(self.fc2(out))
        return self.fc3(out)
