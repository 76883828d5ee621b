"""Model zoo: `build_model(name)` for the architectures of the release (networks take NORMALISED input)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from .densenet import densenet121
from .lenet import LeNet
from .resnet_cifar import resnet18_cifar
from .torchvision_models import resnet18_mnist, resnet50_imagenet
from .vgg import vgg19


@dataclass(frozen=True)
class ModelSpec:
    """Default input channels and classes of a zoo architecture, and what it was used for in the paper."""

    builder: Callable[..., nn.Module]
    in_channels: int
    num_classes: int
    description: str


MODEL_SPECS: dict[str, ModelSpec] = {
    "lenet": ModelSpec(LeNet, 1, 10, "LeNet for MNIST (1x28x28; image_size=32 for 1x32x32 synthetic data)"),
    "resnet18_mnist": ModelSpec(resnet18_mnist, 1, 10, "torchvision ResNet-18 with a 1-channel 7x7 stem, MNIST"),
    "resnet18": ModelSpec(resnet18_cifar, 3, 10, "ResNet-18 for CIFAR-10 (3x32x32)"),
    "vgg19": ModelSpec(vgg19, 3, 10, "VGG-19 without batch norm for CIFAR-10 (3x32x32)"),
    "densenet121": ModelSpec(densenet121, 3, 10, "DenseNet-121 for CIFAR-10 (3x32x32)"),
    "resnet50": ModelSpec(resnet50_imagenet, 3, 1000, "torchvision ResNet-50 for ImageNet (3x224x224)"),
}
MODEL_NAMES: tuple[str, ...] = tuple(MODEL_SPECS)


def build_model(
    name: str,
    num_classes: int | None = None,
    in_channels: int | None = None,
    image_size: int | tuple[int, int] | None = None,
) -> nn.Module:
    """A freshly initialised zoo network (never downloads weights).

    name: one of MODEL_NAMES. num_classes / in_channels: None means the architecture's default
    (10 classes, 1000 for resnet50; 1 channel for lenet and resnet18_mnist, 3 otherwise).
    image_size: (H, W) or a side; only LeNet's layout depends on it (fc1 inputs, default 28); the
    other networks ignore it (their forward raises a clear error on sizes they cannot take).
    Returns a network taking normalised input [B, C, H, W]; wrap it in NormalizedModel for [0, 1] pixels.
    """
    spec = MODEL_SPECS.get(name)
    if spec is None:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    num_classes = spec.num_classes if num_classes is None else num_classes
    in_channels = spec.in_channels if in_channels is None else in_channels
    _check_positive_int(num_classes, "num_classes")
    _check_positive_int(in_channels, "in_channels")
    if name == "lenet":
        return LeNet(
            in_channels=in_channels, num_classes=num_classes, image_size=28 if image_size is None else image_size
        )
    return spec.builder(in_channels=in_channels, num_classes=num_classes)


def _check_positive_int(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive integer, got {value!r}")
