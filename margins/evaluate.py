"""Margin evaluation at any scale: `evaluate_margins(...)` runs the (sample, subspace) grid chunk by chunk.

Rows are sample-major (`margins.sharding.row_grid`) and cut into chunks of `chunk_rows` rows that depend only on
the settings, never on the number of processes. Each chunk is one item of `ChunkDataset` (the distinct samples of
that chunk, loaded through a DataLoader: workers, pinned memory on CUDA), attacked alone by the engine
(`SubspaceDeepFool.attack_rows`, its own chunked clean forward) and committed atomically (`margins.chunks`); then
rank 0 merges the chunks into the result folder (`margins.results.write_report`). Hence: results are bit-identical
for 1 or k processes, peak memory is set by `chunk_rows`, and re-running an interrupted command resumes from the
committed chunks. `ChunkWork` holds these steps, once, for both drivers:

- one process (the default: `devices` 1, `num_nodes` 1, `strategy="auto"`, no torchrun/SLURM/LSF/MPI launcher):
  this process runs the pending chunks itself (`run_in_process`) and never imports Lightning;
- otherwise Lightning's `Trainer.predict` (`margins.predict`, `inference_mode=False`) shares the pending chunks
  out with its unrepeated distributed sampler (no padded duplicates): `RunSettings(devices=2, accelerator="cpu")`
  spawns processes, under `torchrun` or SLURM `srun` Lightning's cluster environments supply the ranks, and any
  explicit `strategy` (e.g. "single_device") goes through Lightning too.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from attacks.deepfool import ENGINE_VERSION, SubspaceDeepFool, precision_record
from common.errors import InputError
from common.memory import keep_freed_memory
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
STOP_MESSAGE = "SIGTERM: stopping; committed chunks are kept, run the same command to resume"
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
    channels_last: bool = False  # the model in channels-last memory format: 1.4x on ResNet-50 on CPU, slower on LeNet

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
    """Processes and run policy. `devices`/`num_nodes` None: from torchrun's environment, else 1. One process
    with `strategy="auto"` runs without Lightning (module docstring); otherwise these are Lightning's settings."""

    accelerator: str = "auto"
    devices: int | str | None = None
    num_nodes: int | None = None
    strategy: str = "auto"
    num_workers: int = 0
    overwrite: bool = False
    progress: bool = True
    threads: int = 1  # CPU intra-op threads per process: float bits depend on it, so it is part of a CPU run
    keep_freed_memory: bool = False  # glibc keeps freed blocks for reuse (`common.memory`; process-wide, CLI default)


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
        "channels_last": attack.channels_last,
        "engine_version": ENGINE_VERSION,
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
    """Check the folder, attack the pending chunks (in this process, or on every rank through Lightning), merge
    on rank 0."""
    device = single_process_device(run)
    predict = _lightning_path() if device is None else None
    start = time.perf_counter()  # `seconds` of the report: from here (imports excluded) to the merge
    trainer = None
    if predict is not None:
        trainer = predict.make_trainer(run, job.output_dir)  # bad --devices etc.: an error before anything is written
        kind = predict.device_type(trainer)
    else:
        kind = device.type
    check_output_dir(job, run.overwrite)
    job.fingerprint["device_type"] = job.settings["device_type"] = kind
    if kind == "cpu":  # BLAS/oneDNN reductions are split by thread: the count changes the float bits
        if run.threads < 1:
            raise InputError(f"--threads must be >= 1, got {run.threads}")
        job.fingerprint["cpu_threads"] = job.settings["cpu_threads"] = run.threads
    # speed only, so not in the fingerprint; applied here and in each worker (`ChunkWork.prepare_process`) and
    # recorded as it took effect (glibc only)
    job.settings["keep_freed_memory"] = run.keep_freed_memory and keep_freed_memory()
    store = ChunkStore(job.output_dir / CHUNK_DIR)
    if not run.overwrite:
        store.check_compatible(job.fingerprint)
    chunks = chunk_ranges(len(job.indices) * len(job.subspaces), attack.chunk_rows)
    done = store.scan(len(chunks)) if not run.overwrite else None
    if done is None or done.problems or len(done.committed) < len(chunks):
        work = ChunkWork(job, attack, run, store, chunks)
        if trainer is None:
            run_in_process(work, device)
        else:
            predict.predict_chunks(trainer, work)
    if trainer is not None and predict.global_rank(trainer) != 0:
        return None, job.output_dir
    report = merge_chunks(job, store, chunks, time.perf_counter() - start)
    write_report(job.output_dir, report, title=job.title)
    return report, job.output_dir


def single_process_device(run: RunSettings) -> torch.device | None:
    """The device if this process alone runs the evaluation without Lightning, else None (Lightning runs it).

    Alone: `devices` 1 or None, `num_nodes` 1 or None, `strategy="auto"`, and no launcher that starts or manages
    processes (`_cluster_launched`). Accelerator cpu; cuda/gpu (device 0); auto: cuda if available, else the CPU
    (unless MPS is available: left to Lightning, which picks it). Anything else, or cuda missing: Lightning (and
    its error message).
    """
    if run.strategy != "auto" or run.num_nodes not in (None, 1) or run.devices not in (None, 1) or _cluster_launched():
        return None
    accelerator = run.accelerator.lower()
    if accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", 0) if torch.cuda.is_available() else None
    if accelerator == "cpu" or (accelerator == "auto" and not torch.backends.mps.is_available()):
        return torch.device("cpu")
    return None


def _lightning_path() -> ModuleType:
    """`margins.predict`, imported (with Lightning) only for runs Lightning drives. Lightning's import sets its
    loggers to INFO: levels chosen before (evaluate_margin.py silences the device banners) are kept."""
    names = ("lightning.pytorch", "lightning.fabric")
    levels = {name: logging.getLogger(name).level for name in names}
    import margins.predict

    for name, level in levels.items():
        if level != logging.NOTSET:
            logging.getLogger(name).setLevel(level)
    return margins.predict


def _cluster_launched() -> bool:
    """Started by torchrun, SLURM (not an interactive job named bash/interactive), LSF's jsrun or MPI with several
    processes: Lightning's cluster environments supply the ranks then (and under SLURM requeue on SIGUSR1)."""
    env = os.environ
    slurm = "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive")
    lsf = {"LSB_JOBID", "JSM_NAMESPACE_SIZE"} <= env.keys()
    mpi = int(env.get("OMPI_COMM_WORLD_SIZE", env.get("PMI_SIZE", "1"))) > 1
    return "TORCHELASTIC_RUN_ID" in env or slurm or lsf or mpi


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


def run_in_process(work: ChunkWork, device: torch.device) -> None:
    """One process, no Lightning: the pending chunks in order, each committed as soon as it is attacked, under
    `torch.no_grad()` like Lightning's predict loop (`inference_mode=False`). A SIGTERM stops at the next chunk
    boundary, as under Lightning; the previous SIGTERM handler is restored after."""
    work.model.to(device)
    work.prepare_process()
    pending = work.prepare_folder()
    work.start_progress(pending)
    try:
        with _sigterm_flag() as received, torch.no_grad():
            for batch in work.loader(pending, device):
                work.commit(work.attack(batch, device), rank=0, sigterm=received.is_set())
    finally:
        work.close_progress()


@contextlib.contextmanager
def _sigterm_flag() -> Iterator[threading.Event]:
    """An event set by SIGTERM while the block runs; a Python handler installed before is called too (as Lightning
    does) and restored after. Outside the main thread no handler can be installed: the event is never set."""
    received = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        received.set()
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


# ---- the steps of every process, whoever drives them -------------------------------------------------------
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


class ChunkWork:
    """The steps of a process on its chunks, the same whether this process drives them (`run_in_process`) or
    Lightning does (`margins.predict`): thread count, folder preparation (rank 0), the chunk loader, the attack of
    one chunk, its commit, the progress bar. The model is a copy cast to the attack's dtype (the caller's is left
    as it is); the driver moves it to the device."""

    def __init__(
        self, job: MarginJob, attack: AttackSettings, run: RunSettings, store: ChunkStore, chunks: list[range]
    ):
        self.job, self.run, self.store, self.chunks = job, run, store, chunks
        self.dtype = DTYPES[attack.dtype]
        self.model = copy.deepcopy(job.model).to(self.dtype)
        self.engine = SubspaceDeepFool(
            overshoot=attack.overshoot,
            max_iter=attack.max_iter,
            num_candidates=attack.num_candidates,
            batch_size=attack.chunk_rows,
            channels_last=attack.channels_last,
        )
        self.progress: _Progress | None = None

    def prepare_process(self) -> None:
        """Thread count (CPU) and, when asked, glibc's malloc keeping freed blocks (`common.memory`)."""
        if self.job.settings["device_type"] == "cpu":
            torch.set_num_threads(self.run.threads)
        if self.run.keep_freed_memory:
            keep_freed_memory()

    def prepare_folder(self) -> list[int]:
        """Rank 0: reset (--overwrite) or verify, write the manifest, report damaged chunks; the pending ids."""
        job, store = self.job, self.store
        if self.run.overwrite:
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

    def start_progress(self, pending: list[int]) -> None:
        """Rank 0's bar over all rows (`run.progress`)."""
        if self.run.progress:
            self.progress = _Progress(self.store, self.chunks, pending)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def loader(self, ids: list[int], device: torch.device) -> DataLoader:
        """One item per chunk id (-1: a no-op item), read by `run.num_workers` workers."""
        data = ChunkDataset(self.job.dataset, self.job.indices, len(self.job.subspaces), self.chunks, ids)
        workers = self.run.num_workers
        return DataLoader(
            data,
            batch_size=1,
            shuffle=False,
            collate_fn=_unwrap,
            num_workers=workers,
            pin_memory=device.type == "cuda",
            persistent_workers=False,
        )

    def attack(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any] | None:
        """The engine on one chunk: `{"chunk", "arrays" (its rows, numpy), "seconds"}`; None for a no-op item."""
        if batch["chunk"] < 0:
            return None
        x = batch["x"].to(device, self.dtype)
        local, subspace = batch["local"].to(device), batch["subspace"].to(device)
        start = time.perf_counter()
        out = self.engine.attack_rows(self.model, x, self.job.subspaces, local, subspace)
        rows = self.chunks[batch["chunk"]]
        y = batch["y"].cpu().numpy()[batch["local"].cpu().numpy()]
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

    def commit(
        self, prediction: dict[str, Any] | None, rank: int, sigterm: bool, stop: type[SystemExit] = SystemExit
    ) -> None:
        """Commit an attacked chunk (atomic file + journal line); after a SIGTERM stop at this chunk boundary:
        the message, then `stop` is raised (Lightning's predict loop would go on otherwise)."""
        if prediction is not None:
            self.store.commit(prediction["chunk"], prediction["arrays"], rank, seconds=prediction["seconds"])
        if sigterm:
            print(STOP_MESSAGE, file=sys.stderr)
            raise stop


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
    precision = precision_record(job.settings.get("device_type", "cpu"), DTYPES[job.settings["dtype"]])
    settings = {**job.settings, "device_name": precision["device"], "precision": precision}
    return MarginReport(
        margins=margins.T,
        converged=converged.T,
        indices=job.indices,
        settings=settings,
        iterations=iterations.T,
        perturbed_labels=perturbed.T,
        predicted=predicted,
        targets=targets,
        extra={
            **summary_extra(iterations, predicted, targets, seconds),
            "num_chunks": len(chunks),
            "engine_seconds": store.engine_seconds(len(chunks)),
        },
    )
