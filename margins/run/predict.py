"""The margin chunks through Lightning's `Trainer.predict`, for one process as for many (spawned, torchrun, SLURM).

Every step is `margins.run.work.ChunkWork`'s: `MarginPredictor.setup` prepares the model for the process's device and,
on rank 0, the folder, then broadcasts the pending chunk ids; Lightning's unrepeated distributed sampler shares
the chunk items out (no padded duplicates); `predict_step` attacks one chunk and `ChunkWriter` commits it when its
batch ends. No collective follows: each rank marks its share done, and rank 0 waits for every chunk to be
committed (`margins.run.work.wait_for_chunks`) before it merges, while the processes watch each other
(`margins.run.guard`): a signal, an error or a lost process on any rank ends every process within seconds.

Lightning's own signal handling (for SIGTERM a broadcast inside the signal handler, which hangs when only one rank
is signalled; for SIGUSR1 under SLURM a checkpoint saved into the chunk folder; Ctrl-C: exit 1 and no line) and its
child-process observer (it kills the main process without saying why) are replaced by `margins.run.guard`'s for these
runs: the watchdog's `common.stop.stop_signals` handles the signals, and the trainer never installs its own.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.utils.data import DataLoader

from common.errors import InputError
from margins.run.guard import START_TIMEOUT, Watchdog, watch_children
from margins.run.work import CHUNK_DIR, ChunkWork
from margins.settings import RunSettings
from margins.store.names import estimator_of, quantity

_LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric")


def make_trainer(run: RunSettings, folder: Path) -> L.Trainer:
    """A predict-only Trainer; Lightning's configuration errors (devices, accelerator, ...) become InputError.
    Collectives time out after `guard.START_TIMEOUT` seconds; under SLURM, Lightning's requeue handler is off (the
    run's own handles SIGUSR1). Lightning's device banners ("GPU available: ...") are not printed."""
    elastic = "TORCHELASTIC_RUN_ID" in os.environ  # started by torchrun: its process counts are the defaults
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1)) if elastic else 1
    devices = run.devices if run.devices is not None else local
    nodes = run.num_nodes
    if nodes is None:
        nodes = max(1, int(os.environ.get("WORLD_SIZE", 1)) // local) if elastic else 1
    plugins = [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else None
    try:
        with _quiet_lightning():
            trainer = L.Trainer(
                accelerator=run.accelerator,
                devices=devices,
                num_nodes=nodes,
                strategy=run.strategy,
                plugins=plugins,
                inference_mode=False,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=str(folder / CHUNK_DIR),
            )
    except (MisconfigurationException, ValueError, TypeError, RuntimeError) as err:
        raise InputError(
            f"cannot run on accelerator {run.accelerator!r}, devices {devices!r}, num_nodes {nodes!r}, "
            f"strategy {run.strategy!r}: {' '.join(str(err).split())}"
        ) from err
    # the run's watchdog handles SIGTERM, SIGUSR1 and SIGINT (module docstring): no public switch turns Lightning's
    # handlers off, so its connector does not register them (the previous handlers stay in place)
    trainer._signal_connector.register_signal_handlers = lambda: None
    if isinstance(trainer.strategy, DDPStrategy):  # bounded collectives (Lightning's default: 30 minutes)
        trainer.strategy._timeout = datetime.timedelta(seconds=START_TIMEOUT)
    if type(trainer.strategy.launcher) is _SubprocessScriptLauncher:
        trainer.strategy._launcher = _WatchedLauncher(trainer.strategy.launcher)
    return trainer


class _WatchedLauncher(_SubprocessScriptLauncher):
    """Lightning's launcher for `--devices N` on one machine, without its child-process observer (which SIGKILLs
    the main process when a child ends, saying nothing): the run's watchdog watches the children instead and names
    the one that died (`guard.watch_children`)."""

    def __init__(self, original: _SubprocessScriptLauncher):
        super().__init__(original.cluster_environment, original.num_processes, original.num_nodes)

    def launch(self, function, *args: Any, trainer: L.Trainer | None = None, **kwargs: Any) -> Any:
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        if not self.cluster_environment.creates_processes_externally:
            self._call_children_scripts()
            watch_children(self.procs)
        return function(*args, **kwargs)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    levels = {name: logging.getLogger(name).level for name in _LIGHTNING_LOGGERS}
    for name in _LIGHTNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def device_type(trainer: L.Trainer) -> str:
    """The trainer's device type: "cpu", "cuda", "mps", ..."""
    return trainer.strategy.root_device.type


def global_rank(trainer: L.Trainer) -> int:
    env = getattr(trainer.strategy, "cluster_environment", None)
    return trainer.global_rank if env is None else max(trainer.global_rank, env.global_rank())


def predict_chunks(trainer: L.Trainer, work: ChunkWork, watchdog: Watchdog) -> None:
    """Every rank: attack and commit its share of the pending chunks (no collective after the loop)."""
    module = MarginPredictor(work, watchdog)
    trainer.callbacks.append(ChunkWriter(work))
    try:
        with _quiet_lightning(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*(LeafSpec|does not have many workers).*")
            trainer.predict(module, return_predictions=False)
    finally:
        module.teardown("predict")  # Lightning skips the hook when predict raises: the process settings come back
        work.close_progress()


def progress_description(work: ChunkWork) -> str:
    """The bar's label, naming what is measured ("DeepFool margins", "certified lower bounds", ...), the family and
    what the bar counts (one bar per family of a command)."""
    settings = work.job.settings
    what = quantity(estimator_of(settings))
    return f"{what}s along {settings.get('subspace', 'the')} subspaces: (sample, subspace) rows"


class MarginPredictor(L.LightningModule):
    """Attacks one chunk per predict step; `setup` prepares the process (`ChunkWork.process`) and, on rank 0, the
    chunk folder, and broadcasts the plan."""

    def __init__(self, work: ChunkWork, watchdog: Watchdog):
        super().__init__()
        self.work, self.watchdog = work, watchdog
        self.pending: list[int] = []
        self._process = contextlib.ExitStack()

    def setup(self, stage: str) -> None:
        self._process.enter_context(self.work.process(self.trainer.strategy.root_device))
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
            self.work.start_progress(plan, progress_description(self.work))

    def teardown(self, stage: str) -> None:
        """Leaves `ChunkWork.process` (threads, malloc): idempotent, so `predict_chunks` calls it whatever happened."""
        self._process.close()

    def predict_dataloader(self) -> DataLoader:
        # Lightning's unrepeated sampler needs an item per rank: fewer pending chunks than ranks -> no-op items (-1)
        padding = [-1] * max(0, self.trainer.world_size - len(self.pending))
        return self.work.loader(self.pending + padding, self.trainer.strategy.root_device)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        return self.work.attack(batch, self.trainer.strategy.root_device)


class ChunkWriter(BasePredictionWriter):
    """Commits each predicted chunk as soon as its batch ends (atomic file + journal line)."""

    def __init__(self, work: ChunkWork):
        super().__init__(write_interval="batch")
        self.work = work

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        self.work.commit(prediction, trainer.global_rank)
