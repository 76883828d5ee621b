"""Input normalisation as a layer in front of a network, so attacks work in [0, 1] pixel space."""

from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """`(x - mean) / std` with `mean: [C, H, W]` (an image: flipped data subtracts the flipped mean image)
    and `std: [C, 1, 1]`. Both are buffers, so they travel with checkpoints.

    x: [B, C, H, W] in the model's input space (pixels in [0, 1], or their frequency transform).
    """

    def __init__(
        self, mean: torch.Tensor | float | list, std: torch.Tensor | float | list, image_shape: tuple[int, int, int]
    ):
        super().__init__()
        channels, height, width = image_shape
        mean_t = torch.as_tensor(mean, dtype=torch.float32)
        std_t = torch.as_tensor(std, dtype=torch.float32)
        self.register_buffer("mean", _broadcast(mean_t, (channels, height, width)).clone())
        self.register_buffer(
            "std", _broadcast(std_t.reshape(-1, 1, 1) if std_t.dim() == 1 else std_t, (channels, 1, 1)).clone()
        )
        if (self.std <= 0).any():
            raise ValueError(f"normalisation std must be positive, got {self.std.flatten().tolist()}")

    @classmethod
    def identity(cls, image_shape: tuple[int, int, int]) -> Normalize:
        return cls(0.0, 1.0, image_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"image_shape={tuple(self.mean.shape)}"


def _broadcast(t: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    if t.dim() == 1:  # per-channel values
        t = t.reshape(-1, 1, 1)
    return t.expand(shape) if t.dim() <= 3 else t


class NormalizedModel(nn.Module):
    """`net(normalize(x))`: a zoo network (which takes normalised input) with its normalisation in front.

    x: [B, C, H, W] in [0, 1] (or the frequency-transformed space); returns logits [B, num_classes].
    """

    def __init__(self, normalize: Normalize, net: nn.Module):
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))
