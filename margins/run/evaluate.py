"""Margin evaluation at any scale: `evaluate_margins(...)` measures the (sample, subspace) grid chunk by chunk.

A job (model, samples, subspaces, output folder, settings) is built from a checkpoint (`job_from_checkpoint`) or
from an in-memory model and dataset (`job_from_model`); `run_job` then attacks its pending chunks through
Lightning's `Trainer.predict` (`margins.run.predict`: one process, several spawned ones, torchrun, SLURM: the same
path) with the steps of `margins.run.work.ChunkWork`, and rank 0 merges the committed chunks into the result folder
(`margins.store.results.write_report`). Results are bit-identical for 1 or k processes, and re-running an interrupted
command resumes from the committed chunks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from torch import nn
from torch.utils.data import Dataset

from attacks.deepfool import ENGINE_VERSION
from common.errors import InputError
from common.memory import can_keep_freed_memory
from frequency.subspaces import FullSpace, SubspaceFamily
from margins.inputs import (
    ModelSource,
    check_forward,
    default_output_dir,
    describe_family,
    gather_samples,
    load_source,
    margin_dataset,
    tensor_bytes,
)
from margins.run.guard import (
    EXIT_BAD_INPUT,
    EXIT_BUG,
    FolderLock,
    RunStopped,
    Watchdog,
    env_rank,
    remove_markers,
)
from margins.run.predict import device_type, make_trainer, predict_chunks
from margins.run.work import (
    CHUNK_DIR,
    ChunkWork,
    MarginJob,
    bytes_to_write,
    chunk_ranges,
    merge_chunks,
    record_device,
    wait_for_chunks,
)
from margins.settings import AttackSettings, RowSettings, RunSettings
from margins.store.chunks import ChunkStore
from margins.store.disk import disk_full, disk_full_error
from margins.store.names import describe_held
from margins.store.results import (
    SUMMARY_FILE,
    MarginReport,
    json_safe,
    read_report,
    remove_stale_tmp_dirs,
    write_report,
)

# settings that do not change a row's bits: left out of the fingerprint a resume must match
_VOLATILE = {"command", "checkpoint", "data_dir", "indices_file", "torch_version", "data", "source", "bases"}
_VOLATILE |= {"run", "epoch", "global_step", "world_size", "trainer_precision", "bound"}
_VOLATILE_DATA_KEYS = ("data_dir", "batch_size", "eval_batch_size", "num_workers", "pin_memory", "download")


# ---- public entry point ------------------------------------------------------------------------------------
def evaluate_margins(
    checkpoint: str | Path | ModelSource | None = None,
    *,
    model: nn.Module | None = None,
    dataset: Dataset | None = None,
    subspaces: SubspaceFamily | None = None,
    indices: np.ndarray | None = None,
    rows: RowSettings | None = None,
    attack: AttackSettings | None = None,
    run: RunSettings | None = None,
    output_dir: str | Path | None = None,
    output_root: str = "outputs/margins",
    title: str = "",
    command: list[str] | None = None,
    reuse_finished: bool = False,
) -> tuple[MarginReport | None, Path]:
    """Measure margins and write the result folder; returns `(report, folder)` (report None on ranks > 0).

    Either `checkpoint` (a path or a `ModelSource`: model, datamodule and data from the checkpoint) or `model` +
    `dataset` + `output_dir` (any classifier `[B, C, H, W] -> logits` and dataset of (image [C, H, W], label)
    items). What is measured: `rows` (`RowSettings`: samples and subspace family, resolved against the checkpoint's
    dataset; default: the paper's 100 samples and DCT blocks); a given family `subspaces` or sample `indices`
    (int [N]) take the place of the rows' (without a checkpoint, subspaces default to the full space). How:
    `attack` (`AttackSettings`), where: `run` (`RunSettings`). Results go to `output_dir` (default for a
    checkpoint: `<output_root>/<model>_<dataset>[_<transform>][_<kind>]_<run>`). `title` heads the figure
    (default: model, dataset and transform). `reuse_finished`: a folder holding a finished evaluation of these very
    settings is read back (`extra["reused"]`) instead of refused (a command of several parts resumes after a
    finished part). The settings objects are read, never changed. Raises InputError on bad input, naming the
    setting.
    """
    started = time.perf_counter()
    rows, attack, run = rows or RowSettings(), attack or AttackSettings(), run or RunSettings()
    rows.check()
    attack.check()
    run.check()
    if checkpoint is not None:
        source = checkpoint if isinstance(checkpoint, ModelSource) else ModelSource(checkpoint)
        job = job_from_checkpoint(source, rows, attack, output_dir, subspaces, indices, command, title, output_root)
    else:
        job = job_from_model(model, dataset, rows, attack, output_dir, subspaces, indices, title)
    job.started = started
    return run_job(job, job.attack, run, reuse_finished)


def job_from_checkpoint(
    source: ModelSource,
    rows: RowSettings,
    attack: AttackSettings,
    output_dir: str | Path | None = None,
    family: SubspaceFamily | None = None,
    indices: np.ndarray | None = None,
    command: list[str] | None = None,
    title: str = "",
    output_root: str = "outputs/margins",
) -> MarginJob:
    """Load and validate the checkpoint's model and data, choose samples and subspaces (InputError if bad); the
    job's `attack` is a copy of `attack` with the dataset's default chunk size when none is given."""
    loaded = load_source(source)
    dm, hp, info = loaded.datamodule, loaded.hparams, loaded.info
    attack = attack.resolved(dm.name)
    family = family if family is not None else rows.family(dm)
    family.check_image_shape(tuple(dm.image_shape))
    from_checkpoint = source.data_dir is None and dm.hparams.data_dir == info.data_hparams.get("data_dir")
    dataset = margin_dataset(dm, from_checkpoint, Path(command[0]).name if command else None)
    indices = rows.indices(len(dataset), dm.name) if indices is None else indices
    kind = describe_family(family)["subspace"]
    default = attack.default_folder(default_output_dir(hp["net"], dm, info.path, kind, output_root))
    folder = Path(output_dir or default).expanduser()
    x, y = gather_samples(dataset, indices[:2])
    check_forward(loaded.model, x, y)
    settings = {
        "source": Path(command[0]).stem if command else "evaluate_margins",
        "command": command,
        "model": hp,
        "data": dict(dm.hparams),
        "checkpoint": str(info.path.resolve()),
        "checkpoint_sha256": loaded.sha256,
        "checkpoint_format": info.kind,
        "normalization": "checkpoint" if info.carries_normalization else "dataset",
        "dataset": dm.name,
        "transform": dm.hparams.transform,
        "bandwidth": dm.hparams.bandwidth,
        "data_dir": str(dm.data_path.resolve()),
        "split": "test",
        **rows.record(),
    }
    transform = "" if dm.hparams.transform == "none" else f" ({dm.hparams.transform})"
    title = title or f"{hp['net']} on {dm.name}{transform}"
    return make_job(loaded.model, dataset, np.asarray(indices, np.int64), family, folder, attack, settings, title)


def job_from_model(
    model: nn.Module | None,
    dataset: Dataset | None,
    rows: RowSettings,
    attack: AttackSettings,
    output_dir: str | Path | None,
    subspaces: SubspaceFamily | None = None,
    indices: np.ndarray | None = None,
    title: str = "",
) -> MarginJob:
    """A job for an in-memory model and dataset (`rows`: its samples; the family is `subspaces`, default the full
    space); the fingerprint holds the SHA-256 of the model's state."""
    missing = [name for name, v in (("model", model), ("dataset", dataset), ("output_dir", output_dir)) if v is None]
    if missing:
        raise InputError(f"without a checkpoint, pass {', '.join(missing)} (and subspaces, default: full space)")
    attack = attack.resolved()
    indices = rows.indices(len(dataset), "given dataset") if indices is None else indices
    x, y = gather_samples(dataset, np.asarray(indices)[:2])
    subspaces = subspaces if subspaces is not None else FullSpace(tuple(x.shape[1:]))
    subspaces.check_image_shape(tuple(x.shape[1:]))
    settings = {
        "source": "evaluate_margins",
        "model": type(model).__name__,
        "checkpoint_sha256": state_sha256(model),
        **rows.record(),
    }
    return make_job(model, dataset, np.asarray(indices, np.int64), subspaces, Path(output_dir), attack, settings, title)


def make_job(
    model: nn.Module,
    dataset: Dataset,
    indices: np.ndarray,
    subspaces: SubspaceFamily,
    folder: Path,
    attack: AttackSettings,
    settings: dict[str, Any],
    title: str,
) -> MarginJob:
    settings = {
        **settings,
        "num_samples": len(indices),
        "indices_sha256": hashlib.sha256(indices.astype(np.int64).tobytes()).hexdigest(),
        **describe_family(subspaces),
        **attack.record(),
        "engine_version": ENGINE_VERSION,
        "torch_version": torch.__version__,
    }
    attack.check_model(model, subspaces.image_shape)
    fingerprint = fingerprint_of(settings)
    figure = settings["subspace"] != "grid"  # a 2-D grid gets its map instead (frequency_analysis.py map2d)
    return MarginJob(model, dataset, indices, subspaces, folder, settings, fingerprint, title, figure, attack=attack)


def fingerprint_of(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a resume must share (JSON-safe): all but those that do not change a row's bits."""
    fingerprint = {k: v for k, v in settings.items() if k not in _VOLATILE}
    if isinstance(settings.get("data"), dict):
        fingerprint["data"] = {k: v for k, v in settings["data"].items() if k not in _VOLATILE_DATA_KEYS}
    return json_safe(fingerprint, "settings")


def state_sha256(model: nn.Module) -> str:
    """SHA-256 of a model's state (parameter and buffer names and bytes): equal weights, equal digests."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()


# ---- the run -----------------------------------------------------------------------------------------------
def run_job(
    job: MarginJob, attack: AttackSettings, run: RunSettings, reuse_finished: bool = False
) -> tuple[MarginReport | None, Path]:
    """Check the folder, attack the pending chunks on every rank through Lightning's `Trainer.predict`, merge on
    rank 0. The main process holds the folder's lock (`guard.FolderLock`); every process runs a watchdog
    (`guard.Watchdog`), so an error, a signal or a lost process on any rank ends them all within seconds. A folder
    this call created is removed again when the run fails before committing anything. A full disk anywhere is the
    one-line InputError naming the folder and the space the run still needs. `reuse_finished`: see
    `evaluate_margins`."""
    trainer = make_trainer(run, job.output_dir)  # bad devices etc.: an error before anything is written
    run = run.resolved(processes_per_node=trainer.num_devices)
    record_device(job, device_type(trainer), run.threads)
    # speed only, so not in the fingerprint; recorded as it takes effect (glibc only) in every process's block
    job.settings["keep_freed_memory"] = run.keep_freed_memory and can_keep_freed_memory()
    rank = env_rank()
    if reuse_finished and not run.overwrite and (finished := finished_report(job)) is not None:
        return (finished if rank == 0 else None), job.output_dir
    check_output_dir(job, run.overwrite)
    created = not job.output_dir.exists()
    try:
        with FolderLock(job.output_dir) if rank == 0 else contextlib.nullcontext():
            return _run_locked(job, attack, run, trainer, rank)
    except BaseException as err:
        if created and rank == 0:
            remove_if_unused(job.output_dir)
        if isinstance(err, OSError) and disk_full(err):  # before the run's own handling (the lock's file)
            chunks = chunk_ranges(len(job.indices) * len(job.subspaces), attack.chunk_rows)
            store = ChunkStore(job.output_dir / CHUNK_DIR)
            raise disk_full_error(job.output_dir, bytes_to_write(job, store, chunks, attack.precision)) from err
        raise


def finished_report(job: MarginJob) -> MarginReport | None:
    """The report of a finished evaluation of the job's very settings in its folder (the chunks' manifest holds
    the job's fingerprint, every result file its recorded SHA-256), marked `extra["reused"]`; else None."""
    if not (job.output_dir / SUMMARY_FILE).is_file():
        return None
    try:
        manifest = ChunkStore(job.output_dir / CHUNK_DIR).read_manifest()
        if manifest is None or manifest["fingerprint"] != json.loads(json.dumps(job.fingerprint)):
            return None
        report = read_report(job.output_dir)
    except (OSError, ValueError):  # ResumeMismatchError, an unreadable or inconsistent set: not reused
        return None
    seconds = time.perf_counter() - job.started
    report.extra = {**report.extra, "reused": True, "seconds": seconds}  # this run's seconds (`time_line`)
    return report


def _run_locked(
    job: MarginJob, attack: AttackSettings, run: RunSettings, trainer, rank: int
) -> tuple[MarginReport | None, Path]:
    store = ChunkStore(job.output_dir / CHUNK_DIR)
    if not run.overwrite:
        store.check_compatible(job.fingerprint)
    if rank == 0:  # under the lock no other run writes here: what a killed writer left goes
        remove_stale_tmp_dirs(job.output_dir, older_than=0.0)
        if "LOCAL_RANK" not in os.environ and "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
            remove_markers(store.root)  # the other ranks, if any, are not started yet
    chunks = chunk_ranges(len(job.indices) * len(job.subspaces), attack.chunk_rows)
    work = ChunkWork(job, attack, run, store, chunks)

    def attack_share(watchdog: Watchdog) -> None:
        done = store.scan(chunks, work.fingerprint) if not run.overwrite else None
        if done is None or done.problems or len(done.committed) < len(chunks):
            predict_chunks(trainer, work, watchdog)

    report = measure_chunks(work, rank, trainer.world_size, attack_share, requeue=SLURMEnvironment.detect())
    return report, job.output_dir


def measure_chunks(
    work: ChunkWork,
    rank: int,
    world_size: int,
    attack_share: Callable[[Watchdog], None],
    requeue: bool = False,
) -> MarginReport | None:
    """The measurement once its folder is chosen and locked, the same for the commands and the training callback:
    under a watchdog (`guard.Watchdog`: a signal, an error or a lost process on any rank ends every rank), this
    rank attacks its share of the pending chunks (`attack_share(watchdog)`: `Trainer.predict` for the commands,
    the running fit's ranks for the callback) and says so; rank 0 waits for every chunk, merges them and writes the
    result files. Any failure is written to the run's stop file first (`_stop_everywhere`: exit 2 for bad input,
    1 for a bug, a full disk as the one line naming the folder), so every other rank stops too. The report on rank
    0, None on the others."""
    store = work.store
    with Watchdog(store.root, rank, world_size, requeue=requeue) as watchdog:
        try:
            attack_share(watchdog)
            watchdog.done()
            if rank != 0:
                return None
            wait_for_chunks(store, work.chunks, work.fingerprint)
            report = merge_chunks(work.job, store, work.chunks)
            write_report(work.job.output_dir, report, figure=work.job.figure, title=work.job.title)
        except BaseException as err:
            stop = _stop_everywhere(err, watchdog, work, rank)
            if stop is err:
                raise
            raise stop from err
    remove_markers(store.root)
    return report


def _stop_everywhere(err: BaseException, watchdog: Watchdog, work: ChunkWork, rank: int) -> BaseException:
    """What the run raises for `err`, once the stop file tells every other rank (exit 2 for an input error, 1 for
    a bug); a full disk becomes the one-line InputError naming the folder and the space the run still needs."""
    if isinstance(err, RunStopped):
        return err  # its stop file is written: by this rank's signal handler, its watchdog, or another rank
    if isinstance(err, OSError) and disk_full(err):
        err = disk_full_error(work.job.output_dir, work.bytes_needed())
    if isinstance(err, InputError):
        watchdog.write_stop(EXIT_BAD_INPUT, f"error: {' '.join(str(err).split())}")
    else:
        watchdog.write_stop(EXIT_BUG, f"rank {rank} failed: {type(err).__name__}: {' '.join(str(err).split())}")
    return err


def remove_if_unused(folder: Path) -> None:
    """Remove a result folder that holds no committed chunk and no result (what a failed start leaves)."""
    chunks = folder / CHUNK_DIR
    if (folder / SUMMARY_FILE).exists() or any(chunks.glob("chunk-*.npz")):
        return
    shutil.rmtree(folder, ignore_errors=True)


def check_output_dir(job: MarginJob, overwrite: bool) -> None:
    """Read-only checks every process makes, before anything is written: a folder (not a file) under a writable
    parent, no finished evaluation in it unless `overwrite`."""
    folder = job.output_dir
    if folder.exists() and not folder.is_dir():
        raise InputError(f"output folder {folder} exists and is not a directory; choose another output folder")
    if (folder / SUMMARY_FILE).is_file() and not overwrite:
        raise InputError(
            f"{folder.resolve()} already holds a finished evaluation ({SUMMARY_FILE}: {held_there(job)}); overwrite "
            "it (overwrite=True, --overwrite) or choose another output folder"
        )
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InputError(f"cannot write to the output folder {folder}: {existing} is not writable")


def held_there(job: MarginJob) -> str:
    """What the job's finished folder holds against the job: its estimator and the settings that differ."""
    try:
        settings = json.loads((job.output_dir / SUMMARY_FILE).read_text()).get("settings", {})
    except (OSError, ValueError, AttributeError):
        return "unreadable"
    there = fingerprint_of(settings) if isinstance(settings, dict) else {}
    return describe_held({k: there.get(k) for k in job.fingerprint}, job.fingerprint)
