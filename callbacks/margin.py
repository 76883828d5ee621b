"""Measure margins along the DCT subspaces during training (and validate / test runs); log them to TensorBoard.

TensorBoard view (rank 0, the first TensorBoardLogger of the trainer), all at the step Lightning uses for the
`val/*` metrics of the same validation (`fit_loop.epoch_loop._batches_that_stepped`):

- CUSTOM SCALARS, section "margin" (layout `MARGIN_LAYOUT`, event tag `custom_scalars__config__`): one chart
  with every `margin/median/subspace_SS`, one with the low/high band medians and `margin/high_over_low`, one
  with `margin/clean_acc` and `margin/not_converged`.
- Scalars: `margin/median/subspace_SS` (median over the samples, converged or not, as summary.json's
  `median_margin_all`); `margin/band_median/low` and `.../high`: median over all samples of the `band_width`
  lowest / highest frequency subspaces (the definition of docs/RESULTS.md); `margin/high_over_low` = high / low;
  `margin/clean_acc`: accuracy of the clean predictions on the measured samples; `margin/not_converged`: number
  of (sample, subspace) rows where DeepFool hit max_iter.
- Histograms `margin/subspace_SS`; images `margin/distribution` (the paper's plot, `plot_margins`) and
  `margin/evolution` (median per subspace x measured epoch, `plot_margin_evolution`).
- HPARAMS: model, data and margin settings, with metrics `hparams/val_acc` (the last `val/acc`),
  `margin/high_over_low` and `margin/clean_acc`. Configs set `default_hp_metric: false` (no `hp_metric = -1`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from attacks.deepfool import SubspaceDeepFool
from frequency import DCTBlockSubspaces
from margins import figure_to_array, gather_samples, plot_margins, save_margin_report, select_indices
from margins.plot import plot_margin_evolution
from margins.sharding import chunk_ranges, row_grid, shard_range

MARGIN_LAYOUT = {
    "margin": {
        "median margin per subspace (L2)": ["Multiline", [r"margin/median/subspace_.*"]],
        "low / high band medians, high_over_low": ["Multiline", [r"margin/band_median/.*", r"margin/high_over_low"]],
        "clean accuracy and not-converged rows": ["Multiline", [r"margin/clean_acc", r"margin/not_converged"]],
    }
}
FIELDS = ("margins", "converged", "iterations", "predicted", "targets")  # rows of the gathered [5, R] buffer


class MarginCallback(L.Callback):
    """Runs batched subspace DeepFool on a fixed evaluation subset at the end of validation / test epochs.

    Args:
        num_samples: samples of `datamodule.margin_dataset()` (the test split) to measure; the same ones every time.
        seed: seed choosing those samples.
        every_n_epochs: measure every N validation epochs during `fit` (always in `validate` / `test` runs).
        measure_at_fit_end: also measure the final model when `fit` ends (last epoch, EarlyStopping, max_time),
            unless the last validation already measured it.
        on_test: also measure at the end of `test` runs.
        subspace_block, subspace_step: DCT block settings (default: the datamodule's, REFERENCE §3).
        max_iter, overshoot: DeepFool settings (release: 100, 0.02).
        batch_size: rows (sample, subspace) per attack batch; also the chunk shared out under DDP.
        band_width: subspaces in the low and in the high band (capped at half the subspaces).
        log_figure: log the paper's plot `margin/distribution` and the history image `margin/evolution`.
        enabled: False turns the callback off (`--margin.enabled false`).

    Work is split in chunks of `batch_size` sample-major rows (`margins.sharding`); each rank attacks its
    contiguous share of chunks, each chunk alone with only its own samples, so results are bit-identical for
    any number of processes (a rank may get no chunk). Every rank makes the same fixed-size all_gather calls.
    Only rank 0 writes `<log_dir>/margins/epoch_XXX/` (`test_epoch_XXX` in test runs) and logs to TensorBoard.
    The median history (`margin/evolution`) is part of `state_dict`, so a resumed run keeps it.
    """

    def __init__(
        self,
        num_samples: int = 100,
        seed: int = 0,
        every_n_epochs: int = 1,
        measure_at_fit_end: bool = True,
        on_test: bool = True,
        subspace_block: int | None = None,
        subspace_step: int | None = None,
        max_iter: int = 100,
        overshoot: float = 0.02,
        batch_size: int = 512,
        band_width: int = 3,
        log_figure: bool = True,
        enabled: bool = True,
    ):
        if every_n_epochs < 1 or num_samples < 1 or band_width < 1:
            raise ValueError("every_n_epochs, num_samples and band_width must be >= 1")
        self.num_samples, self.seed, self.every_n_epochs, self.on_test = num_samples, seed, every_n_epochs, on_test
        self.measure_at_fit_end, self.band_width = measure_at_fit_end, band_width
        self.subspace_block, self.subspace_step = subspace_block, subspace_step
        self.attack = SubspaceDeepFool(overshoot=overshoot, max_iter=max_iter, batch_size=batch_size)
        self.log_figure, self.enabled = log_figure, enabled
        self.history: dict[int, list[float]] = {}  # epoch -> median margin per subspace
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        self._train_epoch = 0
        self._last_val: tuple[int, int, int] | None = None  # (global_step, epoch, log step) of the last validation
        self._measured_global_step: int | None = None
        self._layout_dir: str | None = None

    # ---- state -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"history": {int(e): list(m) for e, m in self.history.items()}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = {int(e): [float(v) for v in m] for e, m in state_dict.get("history", {}).items()}

    # ---- hooks -------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset_fit_state()

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._train_epoch = trainer.current_epoch

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.enabled:
            return
        epoch, step = trainer.current_epoch, log_step(trainer)
        if trainer.state.fn != "fit":
            self.measure(trainer, pl_module, f"epoch_{epoch:03d}", step, epoch)
            return
        self._last_val = (trainer.global_step, epoch, step)
        if (epoch + 1) % self.every_n_epochs == 0:
            self._measured_global_step = trainer.global_step
            self.measure(trainer, pl_module, f"epoch_{epoch:03d}", step, epoch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Measure the final model, at the step and epoch of the last validation if it saw these weights.
        The decision depends only on state shared by all ranks, so every rank enters `measure` or none does."""
        if not (self.enabled and self.measure_at_fit_end) or self._measured_global_step == trainer.global_step:
            return
        if self._last_val is not None and self._last_val[0] == trainer.global_step:
            _, epoch, step = self._last_val
        else:
            epoch, step = self._train_epoch, log_step(trainer)
        self._measured_global_step = trainer.global_step
        self.measure(trainer, pl_module, f"epoch_{epoch:03d}", step, epoch)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.on_test and self.enabled:
            self.measure(trainer, pl_module, f"test_epoch_{trainer.current_epoch:03d}", log_step(trainer))

    # ---- work --------------------------------------------------------------------------------------------
    def measure(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        run_name: str,
        step: int | None = None,
        epoch: int | None = None,
    ) -> Path | None:
        """Measure this rank's chunks, gather on every rank, write and log on rank 0 at `step` (default: the
        current Lightning log step); `epoch` given: record the medians in the history. Must be called on every
        rank. Returns the output dir on rank 0."""
        step = log_step(trainer) if step is None else step
        datamodule = trainer.datamodule
        dataset = datamodule.margin_dataset()
        indices = select_indices(len(dataset), min(self.num_samples, len(dataset)), self.seed)
        subspaces = DCTBlockSubspaces(
            datamodule.image_shape,
            self.subspace_block or datamodule.subspace_block,
            self.subspace_step or datamodule.subspace_step,
        )
        start = time.perf_counter()
        rows = self._attack_shard(pl_module, dataset, indices, subspaces, trainer.global_rank, trainer.world_size)
        elapsed = torch.tensor(time.perf_counter() - start, dtype=torch.float64)
        full = _gather_rows(pl_module, rows, self._shard_sizes(len(indices) * len(subspaces), trainer.world_size))
        seconds = float(_all_gather(pl_module, elapsed.reshape(1, 1), trainer.world_size).max())
        margins, converged, iterations, predicted, targets = _unpack(full, len(indices), len(subspaces))
        if epoch is not None:
            self.history[epoch] = np.median(margins.numpy(), axis=1).tolist()
        out_dir = Path(trainer.log_dir or trainer.default_root_dir) / "margins" / run_name  # a broadcast: all ranks
        if not trainer.is_global_zero:
            return None
        settings = self._settings(trainer, pl_module, subspaces, run_name)
        save_margin_report(
            out_dir, margins, converged, iterations, indices, predicted, targets, settings, seconds, title=run_name
        )
        logger = _tensorboard_logger(trainer)
        if logger is not None:
            wrong = (predicted != targets).numpy()
            self._log_tensorboard(trainer, pl_module, logger, margins, converged, wrong, run_name, step)
        return out_dir

    def _shard_sizes(self, total_rows: int, world: int) -> list[int]:
        """Rows attacked by each rank: its contiguous share of the chunks."""
        chunks = chunk_ranges(total_rows, self.attack.batch_size)
        return [sum(len(chunks[c]) for c in shard_range(len(chunks), r, world)) for r in range(world)]

    def _attack_shard(
        self, model: L.LightningModule, dataset: Any, indices: np.ndarray, subspaces: DCTBlockSubspaces, rank, world
    ) -> torch.Tensor:
        """This rank's rows as a float64 CPU buffer [5, R] (FIELDS), R possibly 0."""
        chunks = chunk_ranges(len(indices) * len(subspaces), self.attack.batch_size)
        parts = [
            self._attack_chunk(model, dataset, indices, subspaces, chunks[c])
            for c in shard_range(len(chunks), rank, world)
        ]
        return torch.cat(parts, dim=1) if parts else torch.empty(len(FIELDS), 0, dtype=torch.float64)

    def _attack_chunk(
        self, model: L.LightningModule, dataset: Any, indices: np.ndarray, subspaces: DCTBlockSubspaces, rows: range
    ) -> torch.Tensor:
        """Rows `rows` (sample-major) attacked as one batch holding only their own samples: [5, len(rows)]."""
        samples, subs = row_grid(len(indices), len(subspaces), rows)
        used = sorted(set(samples))
        position = {n: i for i, n in enumerate(used)}
        local = torch.tensor([position[n] for n in samples], dtype=torch.long)
        x, y = gather_samples(dataset, indices[used])
        result = self.attack.attack_rows(model, x, subspaces, local, torch.tensor(subs, dtype=torch.long))
        values = (result.margins, result.converged, result.iterations, result.labels, y[local])
        return torch.stack([v.detach().cpu().to(torch.float64) for v in values])

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
            "chunk_rows": self.attack.batch_size,
            "model": dict(pl_module.hparams),
            "data": dict(trainer.datamodule.hparams),
        }

    # ---- TensorBoard (rank 0 only: no collectives below) -------------------------------------------------
    def _log_tensorboard(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        logger: TensorBoardLogger,
        margins: torch.Tensor,
        converged: torch.Tensor,
        misclassified: np.ndarray,
        run: str,
        step: int,
    ) -> None:
        writer = logger.experiment
        if self._layout_dir != logger.log_dir:
            writer.add_custom_scalars(MARGIN_LAYOUT)
            self._layout_dir = logger.log_dir
        values = margins.numpy()
        medians = np.median(values, axis=1)  # the same medians as summary.json's median_margin_all
        low, high = band_medians(values, self.band_width)
        for s in range(values.shape[0]):
            writer.add_scalar(f"margin/median/subspace_{s:02d}", float(medians[s]), step)
            writer.add_histogram(f"margin/subspace_{s:02d}", values[s], step)
        writer.add_scalar("margin/band_median/low", low, step)
        writer.add_scalar("margin/band_median/high", high, step)
        writer.add_scalar("margin/not_converged", int((~converged).sum()), step)
        if self.log_figure:
            self._log_figures(writer, pl_module, trainer, values, converged.numpy(), misclassified, run, step)
        metrics = {"margin/high_over_low": high / low if low > 0 else float("nan")}
        metrics["margin/clean_acc"] = float(1.0 - misclassified.mean())
        if run.startswith("test_"):
            logger.log_metrics(metrics, step)
        else:  # the HPARAMS tab: settings + these metrics (log_hyperparams also logs them as scalars at `step`)
            val_acc = trainer.callback_metrics.get("val/acc")
            if val_acc is not None:
                metrics["hparams/val_acc"] = float(val_acc)
            logger.log_hyperparams(self._hparams(trainer, pl_module), metrics=metrics, step=step)
        writer.flush()

    def _log_figures(self, writer, pl_module, trainer, margins, converged, misclassified, run, step) -> None:
        stage, epoch = run.rsplit("_", 1)
        subtitle = f"{stage.replace('_', ' ')} {int(epoch)}, {margins.shape[1]} samples"
        title = _describe(pl_module, trainer.datamodule)
        figure = plot_margins(margins, converged, title=title, misclassified=misclassified, subtitle=subtitle)
        writer.add_image("margin/distribution", figure_to_array(figure), step, dataformats="HWC")
        if self.history:
            epochs = sorted(self.history)
            table = np.array([self.history[e] for e in epochs]).T  # [S, E]
            evolution = plot_margin_evolution(epochs, table, title=f"{title}\nmedian margin per subspace")
            writer.add_image("margin/evolution", figure_to_array(evolution), step, dataformats="HWC")

    def _hparams(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Run settings for the HPARAMS tab (flattened by the logger to `model/...`, `data/...`, `margin/...`)."""
        margin = {
            "num_samples": self.num_samples,
            "seed": self.seed,
            "every_n_epochs": self.every_n_epochs,
            "max_iter": self.attack.max_iter,
            "overshoot": self.attack.overshoot,
            "subspace_block": self.subspace_block or trainer.datamodule.subspace_block,
            "subspace_step": self.subspace_step or trainer.datamodule.subspace_step,
            "band_width": self.band_width,
        }
        model = {"class": type(pl_module).__name__, **_public(pl_module.hparams)}
        data = {"class": type(trainer.datamodule).__name__, **_public(trainer.datamodule.hparams)}
        return {"model": model, "data": data, "margin": margin}


def log_step(trainer: L.Trainer) -> int:
    """The step Lightning 2.6 gives `self.log` epoch-level metrics (`LoggerConnector.log_metrics`): the count of
    optimizer-stepped batches BEFORE the current one's increment, i.e. `global_step - 1` at the end-of-epoch
    validation of a fit, 0 in a fresh `validate` / `test` run."""
    return int(trainer.fit_loop.epoch_loop._batches_that_stepped)


def band_medians(margins: np.ndarray, width: int = 3) -> tuple[float, float]:
    """Median over all samples of the `width` lowest and of the `width` highest frequency subspaces of
    `margins: [S, N]` (width capped at S // 2, at least 1, so the bands never overlap when S >= 2)."""
    width = max(1, min(width, margins.shape[0] // 2))
    return float(np.median(margins[:width])), float(np.median(margins[-width:]))


def _public(hparams: Any) -> dict[str, Any]:
    """hparams without private keys (LightningCLI adds `_instantiator`)."""
    return {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}


def _describe(pl_module: L.LightningModule, datamodule: Any) -> str:
    """ "lenet on mnist (transform none)" from the hparams (class names as fallback)."""
    net = pl_module.hparams.get("net", type(pl_module).__name__)
    hp = getattr(datamodule, "hparams", {})
    dataset = hp.get("dataset", type(datamodule).__name__)
    return f"{net} on {dataset} (transform {hp.get('transform', 'none')})"


def _tensorboard_logger(trainer: L.Trainer) -> TensorBoardLogger | None:
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def _all_gather(pl_module: L.LightningModule, value: torch.Tensor, world: int) -> torch.Tensor:
    """[world, *value.shape] on the CPU; no collective when world == 1."""
    if world == 1:
        return value.unsqueeze(0)
    return pl_module.all_gather(value.to(pl_module.device)).cpu()


def _gather_rows(pl_module: L.LightningModule, own: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """All ranks' row buffers `[5, sizes[rank]]`, padded to `max(sizes)` for one fixed-size all_gather, then
    concatenated in rank order: [5, sum(sizes)], the rows in sample-major order."""
    width = max(sizes)
    padded = torch.nn.functional.pad(own, (0, width - own.shape[1]))
    gathered = _all_gather(pl_module, padded, len(sizes))
    return torch.cat([gathered[r, :, : sizes[r]] for r in range(len(sizes))], dim=1)


def _unpack(rows: torch.Tensor, num_samples: int, num_subspaces: int) -> tuple[torch.Tensor, ...]:
    """Sample-major rows [5, N * S] -> margins [S, N] float64, converged [S, N] bool, iterations [S, N] int64,
    predicted [N] and targets [N] int64."""
    grid = rows.view(len(FIELDS), num_samples, num_subspaces)
    margins, converged, iterations = grid[0].T.contiguous(), grid[1].T.bool(), grid[2].T.long()
    return margins, converged, iterations, grid[3, :, 0].long(), grid[4, :, 0].long()


__all__ = ["MARGIN_LAYOUT", "MarginCallback", "band_medians", "log_step"]
