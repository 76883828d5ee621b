"""torchvision's ImageFolder with a given class list; its own module so that torchvision is imported only when
ImageNet images are read (`datamodules.imagenet` imports it then), and the class stays picklable for workers."""

from __future__ import annotations

from collections.abc import Callable

from torchvision.datasets import ImageFolder


class FixedClassImageFolder(ImageFolder):
    """ImageFolder whose class list is given (so val/ uses train/'s indices even if it lacks some classes)."""

    def __init__(self, root: str, classes: list[str], transform: Callable):
        self._given_classes = list(classes)
        super().__init__(root, transform=transform, allow_empty=True)

    def find_classes(self, directory: str) -> tuple[list[str], dict[str, int]]:
        return self._given_classes, {c: i for i, c in enumerate(self._given_classes)}
