"""Standard training of a zoo network on (optionally frequency-transformed) data."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from common import InputError
from lightning_modules.schedules import triangular_lr
from models import Normalize, NormalizedModel, build_model

SCHEDULE_KEY = "lr_schedule"  # checkpoint entry: {"total_steps": int, "max_epochs": int} of the triangular schedule


class ClassifierModule(L.LightningModule):
    """A zoo network with its datamodule's normalisation in front, trained with SGD and the release's recipe.

    Args:
        net: zoo name (`lenet`, `resnet18_mnist`, `resnet18`, `vgg19`, `densenet121`, `resnet50`).
        num_classes, image_shape: linked from the datamodule by `train.py`.
        lr: peak learning rate of the triangular schedule (release: 0.21), or the constant rate.
        schedule: `triangular` (per step: 0 -> lr at `peak_fraction` of training -> 0) or `constant`.
        momentum, weight_decay, nesterov: SGD settings (release: 0.9, 5e-4, no Nesterov).
    Gradient clipping (release: norm 0.5) is a Trainer setting: `trainer.gradient_clip_val` in the configs.

    Resuming (`fit(ckpt_path=...)`) keeps the schedule of the run being resumed: its total number of optimizer
    steps is stored in the checkpoint, and a resume whose trainer would take a different number (another
    `max_epochs`, batch size, device count, ...) is refused with an `InputError` instead of reshaping the schedule.

    `self.model` maps inputs in the data's space (pixels in [0, 1], or their frequency transform) to logits;
    its normalisation buffers are copied from `trainer.datamodule.normalization()` in `setup` and saved in
    checkpoints, so a checkpoint alone rebuilds the model.
    """

    def __init__(
        self,
        net: str = "lenet",
        num_classes: int = 10,
        image_shape: tuple[int, int, int] = (1, 28, 28),
        lr: float = 0.21,
        schedule: str = "triangular",
        peak_fraction: float = 0.4,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        nesterov: bool = False,
    ):
        super().__init__()
        if schedule not in ("triangular", "constant"):
            raise ValueError(f"schedule must be 'triangular' or 'constant', got {schedule!r}")
        self.save_hyperparameters()
        image_shape = tuple(int(v) for v in image_shape)
        network = build_model(net, num_classes=num_classes, in_channels=image_shape[0], image_size=image_shape[1:])
        self.model = NormalizedModel(Normalize.identity(image_shape), network)
        self.train_loss = MeanMetric()
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self._schedule: dict[str, int] | None = None  # this run's triangular schedule (SCHEDULE_KEY)
        self._loaded_schedule: dict[str, int] | None = None  # the schedule of the last checkpoint loaded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, H, W] in the data's input space -> logits [B, num_classes]."""
        return self.model(x)

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is not None and hasattr(datamodule, "normalization"):
            self.load_normalization(datamodule.normalization())

    def load_normalization(self, normalize: Normalize) -> None:
        """Copy a datamodule's normalisation (mean image [C, H, W], std [C, 1, 1]) into the model."""
        target = self.model.normalize
        if normalize.mean.shape != target.mean.shape:
            raise ValueError(
                f"the datamodule's images have shape {tuple(normalize.mean.shape)} but the model was built for "
                f"{tuple(target.mean.shape)}; set model.image_shape to the data's shape"
            )
        with torch.no_grad():
            target.mean.copy_(normalize.mean)
            target.std.copy_(normalize.std)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.model(self.training_inputs(x, y))
        loss = F.cross_entropy(logits, y)
        # Each self.log call costs ~1 ms (10% of a LeNet step): accumulate every step, log the step value only
        # when Lightning writes to the logger (every `log_every_n_steps`), and the epoch values at epoch end.
        self.train_loss.update(loss.detach())
        self.train_acc.update(logits.detach(), y)
        if (self.global_step + 1) % self.trainer.log_every_n_steps == 0:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("train/loss", self.train_loss, prog_bar=True)  # Lightning computes, syncs and resets them
        self.log("train/acc", self.train_acc, prog_bar=True)

    def training_inputs(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Inputs the loss is computed on: the clean batch here; adversarial examples in subclasses."""
        return x

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self.model(x)
        metric.update(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), on_epoch=True, sync_dist=True, prog_bar=stage == "val")
        self.log(f"{stage}/acc", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test", self.test_acc)

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay, nesterov=hp.nesterov
        )
        if hp.schedule == "constant":
            return optimizer
        total = self._schedule_steps()
        scheduler = LambdaLR(optimizer, lambda step: triangular_lr(step, total, 1.0, hp.peak_fraction))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _schedule_steps(self) -> int:
        """Total optimizer steps of the triangular schedule; a resume must match the checkpoint's (InputError)."""
        total, max_epochs = int(self.trainer.estimated_stepping_batches), int(self.trainer.max_epochs)
        stored = self._loaded_schedule if self.trainer.ckpt_path is not None else None
        if stored is not None and stored["total_steps"] != total:
            raise InputError(
                f"cannot resume {self.trainer.ckpt_path}: its triangular learning-rate schedule spans "
                f"{stored['total_steps']} optimizer steps (max_epochs={stored['max_epochs']}), this run would take "
                f"{total} (max_epochs={max_epochs}); resume with --trainer.max_epochs {stored['max_epochs']} and the "
                "same batch size and devices, or start a new run"
            )
        self._schedule = {"total_steps": total, "max_epochs": max_epochs}
        return total

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self._schedule is not None:
            checkpoint[SCHEDULE_KEY] = dict(self._schedule)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._loaded_schedule = checkpoint.get(SCHEDULE_KEY)
