"""Measure margins along the DCT subspaces at validation (and test) end, and log them to TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from attacks.deepfool import MarginResult, SubspaceDeepFool
from frequency import DCTBlockSubspaces
from margins import figure_to_array, gather_samples, measure_margins, plot_margins, save_margin_report, select_indices


class MarginCallback(L.Callback):
    """Runs batched subspace DeepFool on a fixed evaluation subset at the end of validation / test epochs.

    Args:
        num_samples: samples of `datamodule.margin_dataset()` (the test split) to measure; the same ones every time.
        seed: seed choosing those samples.
        every_n_epochs: measure every N validation epochs during `fit` (always in `validate` / `test` runs).
        on_test: also measure at the end of `test` runs.
        subspace_block, subspace_step: DCT block settings (default: the datamodule's, REFERENCE §3).
        max_iter, overshoot, batch_size: DeepFool settings (release: 100, 0.02; batch_size bounds memory).
        log_figure: log the paper's plot as the image `margin/distribution`.
        enabled: False turns the callback off (`--margin.enabled false`).

    Under DDP every rank measures its own shard (`indices[rank::world_size]`); results are all-gathered and
    reassembled in the original order, so they equal a single-process run. Only rank 0 writes
    `<log_dir>/margins/epoch_XXX/` (`test_epoch_XXX` in test runs) and logs to TensorBoard.
    """

    def __init__(
        self,
        num_samples: int = 100,
        seed: int = 0,
        every_n_epochs: int = 1,
        on_test: bool = True,
        subspace_block: int | None = None,
        subspace_step: int | None = None,
        max_iter: int = 100,
        overshoot: float = 0.02,
        batch_size: int = 512,
        log_figure: bool = True,
        enabled: bool = True,
    ):
        if every_n_epochs < 1 or num_samples < 1:
            raise ValueError("every_n_epochs and num_samples must be >= 1")
        self.num_samples, self.seed, self.every_n_epochs, self.on_test = num_samples, seed, every_n_epochs, on_test
        self.subspace_block, self.subspace_step = subspace_block, subspace_step
        self.attack = SubspaceDeepFool(overshoot=overshoot, max_iter=max_iter, batch_size=batch_size)
        self.log_figure, self.enabled = log_figure, enabled

    # ---- hooks -------------------------------------------------------------------------------------------
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.enabled:
            return
        fitting = trainer.state.fn == "fit"
        if fitting and (trainer.current_epoch + 1) % self.every_n_epochs != 0:
            return
        self.measure(trainer, pl_module, f"epoch_{trainer.current_epoch:03d}")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_test and self.enabled:
            self.measure(trainer, pl_module, f"test_epoch_{trainer.current_epoch:03d}")

    # ---- work --------------------------------------------------------------------------------------------
    def measure(self, trainer: L.Trainer, pl_module: L.LightningModule, run_name: str) -> Path | None:
        """Measure on this rank's shard, gather on every rank, write and log on rank 0. Returns the output dir."""
        datamodule = trainer.datamodule
        dataset = datamodule.margin_dataset()
        indices = select_indices(len(dataset), min(self.num_samples, len(dataset)), self.seed)
        subspaces = DCTBlockSubspaces(
            datamodule.image_shape,
            self.subspace_block or datamodule.subspace_block,
            self.subspace_step or datamodule.subspace_step,
        )
        rank, world = trainer.global_rank, trainer.world_size
        x, y = gather_samples(dataset, indices[rank::world])
        run = measure_margins(pl_module, x, subspaces, self.attack)
        full = _gather_shards(pl_module, run.result, y.to(run.result.labels.device), len(indices), rank, world)
        seconds = float(pl_module.all_gather(torch.tensor(run.seconds, device=pl_module.device)).max())
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "margins" / run_name  # a broadcast: all ranks
        if not trainer.is_global_zero:
            return None
        margins, converged, iterations, predicted, targets = full
        settings = self._settings(trainer, pl_module, subspaces, run_name)
        save_margin_report(
            out_dir, margins, converged, iterations, indices, predicted, targets, settings, seconds, title=run_name
        )
        self._log_tensorboard(trainer, margins, converged, run_name)
        return out_dir

    def _settings(self, trainer: L.Trainer, pl_module: L.LightningModule, subspaces: DCTBlockSubspaces, run: str):
        return {
            "source": "MarginCallback",
            "run": run,
            "epoch": trainer.current_epoch,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "num_samples": self.num_samples,
            "seed": self.seed,
            "subspace": "dct",
            "subspace_block": subspaces.block,
            "subspace_step": subspaces.step,
            "num_subspaces": len(subspaces),
            "overshoot": self.attack.overshoot,
            "max_iter": self.attack.max_iter,
            "num_candidates": self.attack.num_candidates,
            "model": dict(pl_module.hparams),
            "data": dict(trainer.datamodule.hparams),
        }

    def _log_tensorboard(self, trainer: L.Trainer, margins: torch.Tensor, converged: torch.Tensor, run: str) -> None:
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers:
            return
        writer, step = loggers[0].experiment, trainer.global_step
        medians = np.median(margins.numpy(), axis=1)  # the same medians as summary.json's median_margin_all
        for s in range(margins.shape[0]):
            writer.add_scalar(f"margin/median/subspace_{s:02d}", float(medians[s]), step)
            writer.add_histogram(f"margin/subspace_{s:02d}", margins[s].numpy(), step)
        if self.log_figure:
            figure = plot_margins(margins.numpy(), converged.numpy(), title=run)
            writer.add_image("margin/distribution", figure_to_array(figure), step, dataformats="HWC")
        writer.flush()


def _gather_shards(
    pl_module: L.LightningModule, result: MarginResult, targets: torch.Tensor, total: int, rank: int, world: int
) -> tuple[torch.Tensor, ...]:
    """All-gather each rank's shard (columns `rank::world` of the [S, N] results, padded to equal width) and
    reassemble the full arrays in the original sample order. Every rank makes the same collective calls."""
    width = math.ceil(total / world)
    own = result.margins.shape[1]
    fields = {
        "margins": result.margins.double(),
        "converged": result.converged.long(),
        "iterations": result.iterations.long(),
        "predicted": result.labels.long().unsqueeze(0),
        "targets": targets.long().unsqueeze(0),
    }
    out = []
    for value in fields.values():
        padded = torch.nn.functional.pad(value, (0, width - own))
        gathered = pl_module.all_gather(padded) if world > 1 else padded.unsqueeze(0)  # [world, rows, width]
        full = torch.empty(value.shape[0], total, dtype=value.dtype)
        for r in range(world):
            count = len(range(r, total, world))
            full[:, r::world] = gathered[r, :, :count].cpu()
        out.append(full)
    margins, converged, iterations, predicted, targets_full = out
    return margins, converged.bool(), iterations, predicted[0], targets_full[0]


__all__ = ["MarginCallback"]
