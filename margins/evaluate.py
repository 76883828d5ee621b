"""Margin evaluation at any scale: `evaluate_margins(...)` runs the (sample, subspace) grid through Lightning.

Rows are sample-major (`margins.sharding.row_grid`) and cut into chunks of `chunk_rows` rows that depend only on
the settings, never on the number of processes. `Trainer.predict` (`inference_mode=False`) shares the pending
chunks out with Lightning's unrepeated distributed sampler (no padded duplicates); each item of the predict
dataset loads the distinct samples of one chunk through a DataLoader (workers, pinned memory on CUDA), the engine
attacks that chunk alone (`SubspaceDeepFool.attack_rows`, its own chunked clean forward) and a
`BasePredictionWriter` commits it atomically (`margins.chunks`). After a barrier rank 0 merges the chunks into the
result folder (`margins.results.write_report`). Hence: results are bit-identical for 1 or k processes, peak memory
is set by `chunk_rows`, and re-running an interrupted command resumes from the committed chunks.

Single process by default; `RunSettings(devices=2, accelerator="cpu")` spawns processes; under `torchrun` or
SLURM `srun` Lightning's cluster environments supply the ranks.
"""

from __future__ import annotations

import copy
import hashlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch import nn
from torch.utils.data import DataLoader, Dataset

from attacks.deepfool import SubspaceDeepFool
from common.errors import InputError
from frequency.subspaces import SubspaceFamily
from margins.chunks import ChunkStore
from margins.inputs import (
    ModelSource,
    check_forward,
    choose_indices,
    default_output_dir,
    load_source,
    make_subspaces,
    margin_dataset,
)
from margins.measure import gather_samples
from margins.report import summary_extra
from margins.results import (
    OPTIONAL_FILES,
    RESULT_FILES,
    SUMMARY_FILE,
    MarginReport,
    json_safe,
    remove_stale_tmp_dirs,
    write_report,
)
from margins.sharding import chunk_ranges, row_grid

DTYPES = {"float32": torch.float32, "float64": torch.float64}
CHUNK_DIR = "chunks"
_VOLATILE_DATA_KEYS = ("data_dir", "batch_size", "eval_batch_size", "num_workers", "pin_memory", "download")


@dataclass
class AttackSettings:
    """DeepFool settings (release defaults) and the chunk size: `chunk_rows` (sample, subspace) rows are attacked
    as one batch and committed as one file; it bounds memory and fixes the float results (keep it to resume)."""

    overshoot: float = 0.02
    max_iter: int = 100
    num_candidates: int = 10
    chunk_rows: int | None = None  # None: 64 for ImageNet, else 512
    dtype: str = "float32"

    def check(self) -> None:
        if (
            self.max_iter < 1
            or (self.chunk_rows is not None and self.chunk_rows < 1)
            or not np.isfinite(self.overshoot)
            or self.overshoot < 0
        ):
            raise InputError("--max-iter and --chunk-rows must be >= 1 and --overshoot a finite number >= 0")
        if self.dtype not in DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class RunSettings:
    """Lightning machinery and run policy. `devices`/`num_nodes` None: from torchrun's environment, else 1."""

    accelerator: str = "auto"
    devices: int | str | None = None
    num_nodes: int | None = None
    strategy: str = "auto"
    num_workers: int = 0
    overwrite: bool = False
    progress: bool = True
    threads: int = 1  # CPU intra-op threads per process: float bits depend on it, so it is part of a CPU run


@dataclass
class MarginJob:
    """Everything validated and loaded: the model, the samples to read, the subspaces and where results go."""

    model: nn.Module
    dataset: Dataset  # items (x [C, H, W] float in the model's input space, y)
    indices: np.ndarray  # int64 [N]
    subspaces: SubspaceFamily
    output_dir: Path
    settings: dict[str, Any]
    fingerprint: dict[str, Any]  # the settings a resume must share
    title: str


# ---- public entry point ------------------------------------------------------------------------------------
def evaluate_margins(
    checkpoint: str | Path | ModelSource | None = None,
    *,
    model: nn.Module | None = None,
    dataset: Dataset | None = None,
    subspaces: SubspaceFamily | None = None,
    indices: np.ndarray | None = None,
    num_samples: int = 100,
    seed: int = 0,
    output_dir: str | Path | None = None,
    attack: AttackSettings | None = None,
    run: RunSettings | None = None,
    title: str = "",
    **subspace_args: Any,
) -> tuple[MarginReport | None, Path]:
    """Measure margins and write the result folder; returns `(report, folder)` (report None on ranks > 0).

    Either `checkpoint` (path or `ModelSource`: model, datamodule and data from the checkpoint; `subspace_args`:
    subspace="dct"|"full", subspace_dim, subspace_step, indices_file) or `model` + `dataset` + `subspaces` +
    `output_dir` (any eval-mode classifier and dataset of (image [C, H, W], label) items). Samples: `indices`, or
    `num_samples` drawn with `seed`. Raises InputError on bad input.
    """
    attack, run = attack or AttackSettings(), run or RunSettings()
    attack.check()
    if checkpoint is not None:
        source = checkpoint if isinstance(checkpoint, ModelSource) else ModelSource(checkpoint)
        job = job_from_checkpoint(source, num_samples, seed, output_dir, attack, **subspace_args)
    else:
        job = job_from_model(model, dataset, subspaces, indices, num_samples, seed, output_dir, attack, title)
    return run_job(job, attack, run)


def job_from_checkpoint(
    source: ModelSource,
    num_samples: int,
    seed: int,
    output_dir: str | Path | None,
    attack: AttackSettings,
    subspace: str = "dct",
    subspace_dim: int | None = None,
    subspace_step: int | None = None,
    indices_file: str | None = None,
    command: list[str] | None = None,
) -> MarginJob:
    """Load and validate the checkpoint's model and data, choose samples and subspaces (InputError if bad)."""
    loaded = load_source(source)
    dm, hp, info = loaded.datamodule, loaded.hparams, loaded.info
    if attack.chunk_rows is None:
        attack.chunk_rows = 64 if dm.name == "imagenet" else 512
    subspaces = make_subspaces(subspace, subspace_dim, subspace_step, dm.image_shape, dm)
    from_checkpoint = source.data_dir is None and dm.hparams.data_dir == info.data_hparams.get("data_dir")
    dataset = margin_dataset(dm, from_checkpoint)
    indices = choose_indices(num_samples, seed, indices_file, len(dataset), dm.name)
    folder = Path(output_dir or default_output_dir(hp["net"], dm, info.path)).expanduser()
    x, y = gather_samples(dataset, indices[:2])
    check_forward(loaded.model, x, y)
    settings = {
        "source": "evaluate_margin",
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
        "seed": seed,
        "indices_file": str(Path(indices_file).expanduser().resolve()) if indices_file else None,
        "subspace": subspace,
    }
    transform = "" if dm.hparams.transform == "none" else f" ({dm.hparams.transform})"
    title = f"{hp['net']} on {dm.name}{transform}"
    return _job(loaded.model, dataset, indices, subspaces, folder, attack, settings, title)


def job_from_model(
    model: nn.Module | None,
    dataset: Dataset | None,
    subspaces: SubspaceFamily | None,
    indices: np.ndarray | None,
    num_samples: int,
    seed: int,
    output_dir: str | Path | None,
    attack: AttackSettings,
    title: str = "",
) -> MarginJob:
    """A job for an in-memory model and dataset; the fingerprint holds the SHA-256 of the model's state."""
    if model is None or dataset is None or subspaces is None or output_dir is None:
        raise InputError("without a checkpoint, pass model, dataset, subspaces and output_dir")
    attack.chunk_rows = attack.chunk_rows or 512
    if indices is None:
        indices = choose_indices(num_samples, seed, None, len(dataset), "given dataset")
    settings = {
        "source": "evaluate_margins",
        "model": type(model).__name__,
        "checkpoint_sha256": _state_sha256(model),
        "seed": seed,
        "subspace": type(subspaces).__name__,
    }
    return _job(
        model.eval(), dataset, np.asarray(indices, np.int64), subspaces, Path(output_dir), attack, settings, title
    )


def _job(
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
        "subspace_block": getattr(subspaces, "block", None),
        "subspace_step": getattr(subspaces, "step", None),
        "num_subspaces": len(subspaces),
        "overshoot": attack.overshoot,
        "max_iter": attack.max_iter,
        "num_candidates": attack.num_candidates,
        "chunk_rows": attack.chunk_rows,
        "dtype": attack.dtype,
        "torch_version": torch.__version__,
    }
    volatile = {"command", "checkpoint", "data_dir", "indices_file", "torch_version", "data", "source"}
    fingerprint = {k: v for k, v in settings.items() if k not in volatile}
    if isinstance(settings.get("data"), dict):
        fingerprint["data"] = {k: v for k, v in settings["data"].items() if k not in _VOLATILE_DATA_KEYS}
    fingerprint = json_safe(fingerprint, "settings")
    return MarginJob(model, dataset, indices, subspaces, folder, settings, fingerprint, title)


def _state_sha256(model: nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# ---- the run -----------------------------------------------------------------------------------------------
def run_job(job: MarginJob, attack: AttackSettings, run: RunSettings) -> tuple[MarginReport | None, Path]:
    """Check the folder, predict the pending chunks on every rank, merge on rank 0."""
    start = time.perf_counter()
    trainer = make_trainer(run, job.output_dir)  # bad --devices etc.: an error before anything is written
    check_output_dir(job, run.overwrite)
    device_type = type(trainer.accelerator).__name__.replace("Accelerator", "").lower()
    job.fingerprint["device_type"] = job.settings["device_type"] = device_type
    if device_type == "cpu":  # BLAS/oneDNN reductions are split by thread: the count changes the float bits
        if run.threads < 1:
            raise InputError(f"--threads must be >= 1, got {run.threads}")
        job.fingerprint["cpu_threads"] = job.settings["cpu_threads"] = run.threads
    store = ChunkStore(job.output_dir / CHUNK_DIR)
    if not run.overwrite:
        store.check_compatible(job.fingerprint)
    chunks = chunk_ranges(len(job.indices) * len(job.subspaces), attack.chunk_rows)
    done = store.scan(len(chunks)) if not run.overwrite else None
    module = None
    if done is None or done.problems or len(done.committed) < len(chunks):
        module = MarginPredictor(job, attack, run, store, chunks)
        writer = ChunkWriter(store)
        trainer.callbacks.append(writer)
        trainer.predict(module, return_predictions=False)
        trainer.strategy.barrier("margins-merge")
    if module is not None and module.progress is not None:
        module.progress.close()
    if _global_rank(trainer) != 0:
        return None, job.output_dir
    report = merge_chunks(job, store, chunks, time.perf_counter() - start)
    write_report(job.output_dir, report, title=job.title)
    return report, job.output_dir


def check_output_dir(job: MarginJob, overwrite: bool) -> None:
    """Read-only checks every process makes: a directory we can write, no finished evaluation to overwrite."""
    folder = job.output_dir
    if folder.exists() and not folder.is_dir():
        raise InputError(f"output folder {folder} exists and is not a directory; choose another --output-dir")
    if (folder / SUMMARY_FILE).is_file() and not overwrite:
        raise InputError(
            f"{folder.resolve()} already holds a finished evaluation ({SUMMARY_FILE}); pass --overwrite to redo it "
            "or choose another --output-dir"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}-{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise InputError(f"cannot write to the output folder {folder}: {err.strerror or err}") from err


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


def _global_rank(trainer: L.Trainer) -> int:
    env = getattr(trainer.strategy, "cluster_environment", None)
    return trainer.global_rank if env is None else max(trainer.global_rank, env.global_rank())


# ---- Lightning pieces --------------------------------------------------------------------------------------
class ChunkDataset(Dataset):
    """Item i = chunk `chunk_ids[i]`: its distinct samples `x: [n, C, H, W]`, labels `y: [n]`, and per row the
    position of its sample in x (`local`) and its subspace (`subspace`)."""

    def __init__(self, dataset: Dataset, indices: np.ndarray, num_subspaces: int, chunks: list[range], ids: list[int]):
        self.dataset, self.indices, self.num_subspaces = dataset, indices, num_subspaces
        self.chunks, self.ids = chunks, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        chunk = self.ids[i]
        if chunk < 0:  # no-op item (fewer chunks than ranks)
            return {"chunk": -1}
        samples, subspaces = row_grid(len(self.indices), self.num_subspaces, self.chunks[chunk])
        used = sorted(set(samples))
        position = {n: k for k, n in enumerate(used)}
        x, y = gather_samples(self.dataset, self.indices[used])
        local = torch.tensor([position[n] for n in samples], dtype=torch.long)
        return {"chunk": chunk, "x": x, "y": y, "local": local, "subspace": torch.tensor(subspaces)}


def _unwrap(batch: list[dict[str, Any]]) -> dict[str, Any]:
    return batch[0]


class MarginPredictor(L.LightningModule):
    """Attacks one chunk per predict step; rank 0 prepares the chunk folder in `setup` and broadcasts the plan."""

    def __init__(
        self, job: MarginJob, attack: AttackSettings, run: RunSettings, store: ChunkStore, chunks: list[range]
    ):
        super().__init__()
        self.dtype_ = DTYPES[attack.dtype]
        self.model = copy.deepcopy(job.model).to(self.dtype_)  # the caller's model is left as it is
        self.job, self.run_settings, self.store, self.chunks = job, run, store, chunks
        self.engine = SubspaceDeepFool(
            overshoot=attack.overshoot,
            max_iter=attack.max_iter,
            num_candidates=attack.num_candidates,
            batch_size=attack.chunk_rows,
        )
        self.pending: list[int] = []
        self.progress: _Progress | None = None

    def setup(self, stage: str) -> None:
        if self.job.settings["device_type"] == "cpu":
            torch.set_num_threads(self.run_settings.threads)
        plan: Any = None
        if self.trainer.is_global_zero:
            try:
                plan = self._prepare_folder()
            except InputError as err:
                plan = f"error: {err}"
        plan = self.trainer.strategy.broadcast(plan, src=0)
        if isinstance(plan, str):
            raise InputError(plan.removeprefix("error: "))
        self.pending = plan
        if self.trainer.is_global_zero and self.run_settings.progress:
            self.progress = _Progress(self.store, self.chunks, plan)

    def _prepare_folder(self) -> list[int]:
        """Rank 0: reset (--overwrite) or verify, write the manifest, report damaged chunks; the pending ids."""
        job, store = self.job, self.store
        if self.run_settings.overwrite:
            store.reset()
            for name in (*RESULT_FILES, *OPTIONAL_FILES):
                (job.output_dir / name).unlink(missing_ok=True)
        store.check_compatible(job.fingerprint)
        manifest = {"fingerprint": job.fingerprint, "settings": job.settings, "num_chunks": len(self.chunks)}
        store.initialise(json_safe(manifest, "manifest"))
        remove_stale_tmp_dirs(job.output_dir, older_than=0.0)
        scan = store.scan(len(self.chunks))
        for problem in scan.problems:
            print(f"warning: {problem}", file=sys.stderr)
        return [c for c in range(len(self.chunks)) if c not in scan.committed]

    def predict_dataloader(self) -> DataLoader:
        # Lightning's unrepeated sampler needs an item per rank: fewer pending chunks than ranks -> no-op items (-1)
        ids = self.pending + [-1] * max(0, self.trainer.world_size - len(self.pending))
        data = ChunkDataset(self.job.dataset, self.job.indices, len(self.job.subspaces), self.chunks, ids)
        workers = self.run_settings.num_workers
        return DataLoader(
            data,
            batch_size=1,
            shuffle=False,
            collate_fn=_unwrap,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            persistent_workers=False,
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any] | None:
        if batch["chunk"] < 0:
            return None
        x = batch["x"].to(self.device, self.dtype_)
        start = time.perf_counter()
        out = self.engine.attack_rows(self.model, x, self.job.subspaces, batch["local"], batch["subspace"])
        rows = self.chunks[batch["chunk"]]
        y = batch["y"].cpu().numpy()[batch["local"].numpy()]
        arrays = {
            "margins": out.margins.cpu().numpy(),
            "converged": out.converged.cpu().numpy(),
            "iterations": out.iterations.cpu().numpy(),
            "perturbed_labels": out.perturbed_labels.cpu().numpy(),
            "predicted": out.labels.cpu().numpy(),
            "targets": y.astype(np.int64),
            "rows": np.array([rows.start, rows.stop], dtype=np.int64),
        }
        return {"chunk": int(batch["chunk"]), "arrays": arrays, "seconds": time.perf_counter() - start}


class ChunkWriter(BasePredictionWriter):
    """Commits each predicted chunk as soon as its batch ends (atomic file + journal line)."""

    def __init__(self, store: ChunkStore):
        super().__init__(write_interval="batch")
        self.store = store

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        if prediction is not None:
            self.store.commit(prediction["chunk"], prediction["arrays"], trainer.global_rank)
        if trainer.received_sigterm:  # Lightning's predict loop would go on: stop at this chunk boundary
            print("SIGTERM: stopping; committed chunks are kept, run the same command to resume", file=sys.stderr)
            raise SIGTERMException


class _Progress:
    """Rank 0's overall bar: rows committed by any rank (polled from the chunk folder), restored rows included."""

    def __init__(self, store: ChunkStore, chunks: list[range], pending: list[int], interval: float = 0.5):
        from tqdm.auto import tqdm

        self.store, self.chunks, self.pending = store, chunks, set(pending)
        total = chunks[-1].stop if chunks else 0
        restored = total - sum(len(chunks[c]) for c in self.pending)
        self.bar = tqdm(total=total, initial=restored, unit="row", desc="margins (sample, subspace) rows")
        self.restored, self.start = restored, time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval,), daemon=True)
        self._thread.start()

    def _poll(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._refresh()

    def _refresh(self) -> None:
        fresh = 0
        for c in self.store.count_present() & self.pending:
            path = self.store.root / self.store.chunk_name(c)
            try:
                fresh += len(self.chunks[c]) if path.stat().st_mtime >= self.start - 1 else 0
            except FileNotFoundError:
                continue
        self.bar.update(self.restored + fresh - self.bar.n)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._refresh()
        self.bar.close()


# ---- merge -------------------------------------------------------------------------------------------------
def merge_chunks(job: MarginJob, store: ChunkStore, chunks: list[range], seconds: float) -> MarginReport:
    """Rank 0: every committed chunk into `[S, N]` arrays (float32 margins) and the report."""
    num_subspaces, num_samples = len(job.subspaces), len(job.indices)
    grid = (num_samples, num_subspaces)  # sample-major rows
    margins = np.zeros(grid, np.float32)
    converged = np.zeros(grid, bool)
    iterations, perturbed = np.zeros(grid, np.int64), np.zeros(grid, np.int64)
    predicted, targets = np.zeros(num_samples, np.int64), np.zeros(num_samples, np.int64)
    for c, rows in enumerate(chunks):
        data = store.load(c)
        if tuple(data["rows"]) != (rows.start, rows.stop):
            raise RuntimeError(f"chunk {c} holds rows {tuple(data['rows'])}, expected {(rows.start, rows.stop)}")
        sl = slice(rows.start, rows.stop)
        margins.reshape(-1)[sl] = data["margins"].astype(np.float32)
        converged.reshape(-1)[sl], iterations.reshape(-1)[sl] = data["converged"], data["iterations"]
        perturbed.reshape(-1)[sl] = data["perturbed_labels"]
        samples = np.arange(rows.start, rows.stop) // num_subspaces
        predicted[samples], targets[samples] = data["predicted"], data["targets"]
    settings = {**job.settings, "device_name": _device_name(job.settings.get("device_type", "cpu"))}
    return MarginReport(
        margins=margins.T,
        converged=converged.T,
        indices=job.indices,
        settings=settings,
        iterations=iterations.T,
        perturbed_labels=perturbed.T,
        predicted=predicted,
        targets=targets,
        extra={**summary_extra(iterations, predicted, targets, seconds), "num_chunks": len(chunks)},
    )


def _device_name(device_type: str) -> str:
    if device_type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return platform.processor() or platform.machine()
