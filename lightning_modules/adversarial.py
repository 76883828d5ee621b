"""Adversarial training with L2 PGD, on plain or frequency-flipped data (the exact projection onto ball ∩ box)."""

from __future__ import annotations

from typing import Any

import torch
from torchmetrics.classification import MulticlassAccuracy

from attacks.pgd import L2PGD
from lightning_modules.classifier import ClassifierModule

PROJECTIONS = ("ball_box", "exact", "dykstra")


class AdversarialModule(ClassifierModule):
    """`ClassifierModule` trained on L2 PGD examples; also logs robust accuracy `val/robust_acc`, `test/robust_acc`.

    Args (besides ClassifierModule's):
        eps: L2 radius in the input space (release: 2 MNIST, 1 CIFAR-10, 3 ImageNet).
        attack_steps: PGD steps; attack_step_size: L2 step length (default `2.5 * eps / steps`, MadryLab).
        random_start: start on the eps sphere (MadryLab).
        projection: how iterates return to {L2 ball} ∩ {valid images}: `ball_box` (ball then box: standard PGD,
            MadryLab's; not the nearest feasible point), `exact` (the Euclidean projection onto the intersection
            in closed form, two flips per projection on flipped data) or `dykstra` (the same projection by
            Dykstra's algorithm to a 1e-6 tolerance, the paper's release; a LeNet step on flipped MNIST takes
            1.8x as long as with `exact` on CPU, `benchmarks/bench_training.py`).
        flipped: the data is frequency-flipped, so the box is {z : flip(z) in [0, 1]^d} (valid original images).
        clip: keep adversarial examples valid images; False projects onto the ball only (e.g. synthetic data).
        eval_attack: also attack the validation/test batches and log robust accuracy.
    The attack runs with the model in eval mode (MadryLab) and the loss is taken on the adversarial batch only.
    Under a mixed-precision trainer (`bf16-mixed`, `16-mixed`) the attack's model passes run under autocast, its
    projections and norms in float32 (`attacks.pgd`).
    """

    def __init__(
        self,
        eps: float = 2.0,
        attack_steps: int = 7,
        attack_step_size: float | None = None,
        random_start: bool = True,
        projection: str = "ball_box",
        flipped: bool = False,
        clip: bool = True,
        eval_attack: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)  # net, num_classes, image_shape, lr, ...: ClassifierModule's arguments
        if projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {', '.join(PROJECTIONS)}, got {projection!r}")
        self.save_hyperparameters()
        self.attack = L2PGD(
            eps=eps,
            steps=attack_steps,
            step_size=attack_step_size,
            random_start=random_start,
            projection=projection if clip else "ball",
            flipped=flipped,
        )
        self.val_robust_acc = MulticlassAccuracy(num_classes=self.hparams.num_classes, average="micro")
        self.test_robust_acc = MulticlassAccuracy(num_classes=self.hparams.num_classes, average="micro")

    def training_inputs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.attack(self.model, x, y)

    def _robust_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        if not self.hparams.eval_attack:
            return
        x, y = batch
        x_adv = self.attack(self.model, x, y)
        with torch.no_grad():
            metric.update(self.model(x_adv), y)
        self.log(f"{stage}/robust_acc", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        self._robust_step(batch, "val", self.val_robust_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        self._robust_step(batch, "test", self.test_robust_acc)
