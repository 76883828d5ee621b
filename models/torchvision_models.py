"""torchvision-based networks: ResNet-18 for MNIST (release layout) and ResNet-50 for ImageNet. Never downloads.

torchvision (about 2 s to import, most of it torch._dynamo through torchvision.ops) is imported when one of these
networks is built, not with the model zoo."""

from __future__ import annotations

from torch import nn


def _replace_stem(net: nn.Module, in_channels: int) -> None:
    net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)


def resnet18_mnist(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 with `conv1` = Conv2d(in_channels, 64, 7, stride 2, padding 3, no bias); `fc` head.

    x: [B, in_channels, H, W] normalised (adaptive pooling: any H, W >= 1 after the stem, e.g. 28x28).
    """
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=num_classes)
    _replace_stem(net, in_channels)
    return net


def resnet50_imagenet(in_channels: int = 3, num_classes: int = 1000) -> nn.Module:
    """torchvision ResNet-50 (random init, no download); the stem is replaced only when in_channels != 3.

    x: [B, in_channels, H, W] normalised (224x224 for ImageNet; smaller inputs work thanks to adaptive pooling).
    """
    from torchvision.models import resnet50

    net = resnet50(weights=None, num_classes=num_classes)
    if in_channels != 3:
        _replace_stem(net, in_channels)
    return net
