"""LightningModules: standard and adversarial (L2 PGD) training of zoo networks."""

from lightning_modules.adversarial import AdversarialModule
from lightning_modules.classifier import ClassifierModule

__all__ = ["AdversarialModule", "ClassifierModule"]
