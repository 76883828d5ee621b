"""`EpochLine`: one plain line per training epoch (and, in a long epoch, one every `every_s` seconds), so that a run
whose output goes to a log file, a pipe or a cluster job says how far it is:

    epoch 2/3 done: train loss 0.1432, val loss 0.0712, val acc 0.9781, 41 s so far
    epoch 3/3, step 120/469: train loss 0.0911, 61 s so far

The train loss is the mean of the `training_step` losses of rank 0's batches since the epoch began; val figures are
the epoch's `val/loss`, `val/acc` (and `val/robust_acc` where logged), shown when validation ran in that epoch.
Rank 0 prints. Where Lightning's progress bar is on and stdout is a terminal, the bar already shows the running
figures: epoch lines go through the bar's own `print` (above it, without breaking it) and no step lines are printed.

Add it to a run: `python train.py fit ... --trainer.callbacks+=callbacks.EpochLine` (scripts/reproduce.py does).
"""

from __future__ import annotations

import math
import re
import sys
import time
from typing import Any

import lightning as L
import torch

LINE = re.compile(r"^epoch \d+(/\d+)?[ ,]")  # how a reader of the output (scripts/reproduce.py) recognises a line
VAL_KEYS = (("val loss", "val/loss"), ("val acc", "val/acc"), ("val robust acc", "val/robust_acc"))


class EpochLine(L.Callback):
    """A line per training epoch with the train loss, the validation loss and accuracy and the seconds since fit
    began; within an epoch a line every `every_s` seconds (0: after every step; `math.inf`: never)."""

    def __init__(self, every_s: float = 60.0) -> None:
        if every_s < 0:
            raise ValueError(f"every_s must be >= 0 seconds, got {every_s}")
        self.every_s = every_s
        self.started = self.last_line = 0.0
        self.loss_sum, self.loss_count = 0.0, 0
        self.validated: dict[str, float] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = self.last_line = time.perf_counter()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loss_sum, self.loss_count, self.validated = 0.0, 0, {}

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.loss_sum += float(loss.detach())
            self.loss_count += 1
        if self._bar_shown(trainer) or time.perf_counter() - self.last_line < self.every_s:
            return
        total = trainer.num_training_batches
        of = f"/{int(total)}" if math.isfinite(total) else ""
        self._print(trainer, f"{self._epoch(trainer)}, step {batch_idx + 1}{of}: {self._loss()}")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metrics = trainer.callback_metrics
        self.validated = {label: float(metrics[key]) for label, key in VAL_KEYS if key in metrics}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        parts = [self._loss(), *(f"{label} {value:.4f}" for label, value in self.validated.items())]
        self._print(trainer, f"{self._epoch(trainer)} done: {', '.join(parts)}")

    def _epoch(self, trainer: L.Trainer) -> str:
        total = trainer.max_epochs
        return f"epoch {trainer.current_epoch + 1}" + (f"/{total}" if total and total > 0 else "")

    def _loss(self) -> str:
        return f"train loss {self.loss_sum / self.loss_count:.4f}" if self.loss_count else "no training step"

    @staticmethod
    def _bar_shown(trainer: L.Trainer) -> bool:
        return trainer.progress_bar_callback is not None and sys.stdout.isatty()

    def _print(self, trainer: L.Trainer, text: str) -> None:
        self.last_line = time.perf_counter()
        if not trainer.is_global_zero:
            return
        line = f"{text}, {self.last_line - self.started:.0f} s so far"
        bar = trainer.progress_bar_callback
        if bar is not None and sys.stdout.isatty():
            bar.print(line)
        else:
            print(line, flush=True)
