"""The margin chunks through Lightning's `Trainer.predict`: several processes (spawned, torchrun, SLURM, ...), or an
explicit `strategy`. `margins.evaluate.run_job` imports this module only for those runs.

Every step is `margins.evaluate.ChunkWork`'s, as in the single-process loop: `MarginPredictor.setup` prepares the
folder on rank 0 and broadcasts the pending chunk ids, Lightning's unrepeated distributed sampler shares the chunk
items out (no padded duplicates), `predict_step` attacks one chunk and `ChunkWriter` commits it when its batch
ends (and stops at that chunk boundary after a SIGTERM); a barrier precedes rank 0's merge.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch.utils.data import DataLoader

from common.errors import InputError
from margins.evaluate import CHUNK_DIR, ChunkWork, RunSettings


def make_trainer(run: RunSettings, folder: Path) -> L.Trainer:
    """A predict-only Trainer; Lightning's configuration errors (devices, accelerator, ...) become InputError."""
    elastic = "TORCHELASTIC_RUN_ID" in os.environ  # started by torchrun: its process counts are the defaults
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if elastic else 1
    devices = run.devices if run.devices is not None else local
    nodes = run.num_nodes
    if nodes is None:
        nodes = max(1, int(os.environ.get("WORLD_SIZE", 1)) // local) if elastic else 1
    try:
        return L.Trainer(
            accelerator=run.accelerator,
            devices=devices,
            num_nodes=nodes,
            strategy=run.strategy,
            inference_mode=False,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=str(folder / CHUNK_DIR),
        )
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as err:
        raise InputError(
            f"cannot run on --accelerator {run.accelerator} --devices {devices} --num-nodes {nodes} "
            f"--strategy {run.strategy}: {' '.join(str(err).split())}"
        ) from err


def device_type(trainer: L.Trainer) -> str:
    """The trainer's accelerator as "cpu", "cuda", "mps", ..."""
    return type(trainer.accelerator).__name__.replace("Accelerator", "").lower()


def global_rank(trainer: L.Trainer) -> int:
    env = getattr(trainer.strategy, "cluster_environment", None)
    return trainer.global_rank if env is None else max(trainer.global_rank, env.global_rank())


def predict_chunks(trainer: L.Trainer, work: ChunkWork) -> None:
    """Every rank: attack and commit its share of the pending chunks, then wait for the others."""
    module = MarginPredictor(work)
    trainer.callbacks.append(ChunkWriter(work))
    try:
        trainer.predict(module, return_predictions=False)
        trainer.strategy.barrier("margins-merge")
    finally:
        work.close_progress()


class MarginPredictor(L.LightningModule):
    """Attacks one chunk per predict step; rank 0 prepares the chunk folder in `setup` and broadcasts the plan."""

    def __init__(self, work: ChunkWork):
        super().__init__()
        self.work = work
        self.model = work.model  # a submodule: Lightning moves it to the device
        self.pending: list[int] = []

    def setup(self, stage: str) -> None:
        self.work.prepare_process()
        plan: Any = None
        if self.trainer.is_global_zero:
            try:
                plan = self.work.prepare_folder()
            except InputError as err:
                plan = f"error: {err}"
        plan = self.trainer.strategy.broadcast(plan, src=0)
        if isinstance(plan, str):
            raise InputError(plan.removeprefix("error: "))
        self.pending = plan
        if self.trainer.is_global_zero:
            self.work.start_progress(plan)

    def predict_dataloader(self) -> DataLoader:
        # Lightning's unrepeated sampler needs an item per rank: fewer pending chunks than ranks -> no-op items (-1)
        return self.work.loader(self.pending + [-1] * max(0, self.trainer.world_size - len(self.pending)), self.device)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        return self.work.attack(batch, self.device)


class ChunkWriter(BasePredictionWriter):
    """Commits each predicted chunk as soon as its batch ends (atomic file + journal line); after a SIGTERM
    (Lightning's predict loop would go on) it stops at this chunk boundary with Lightning's SIGTERMException."""

    def __init__(self, work: ChunkWork):
        super().__init__(write_interval="batch")
        self.work = work

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        self.work.commit(prediction, trainer.global_rank, trainer.received_sigterm, SIGTERMException)
