"""The chunk work of a margin evaluation, the same for every driver (`evaluate_margins`, `MarginCallback`).

The (sample, subspace) rows of a job are sample-major (`margins.run.work.row_grid`) and cut into chunks of
`chunk_rows` rows that depend only on the settings, never on the number of processes. Each chunk is one item of
`ChunkDataset` (the distinct samples of that chunk, read through a DataLoader), attacked alone by the engine
(`SubspaceDeepFool.attack_rows`, on a model prepared once per process) and committed atomically
(`margins.store.chunks.ChunkStore`); rank 0 then merges the committed chunks into a `MarginReport` (`merge_chunks`).
Hence results are bit-identical for 1 or k processes, peak memory is set by `chunk_rows`, and an interrupted run
resumes from its committed chunks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from attacks.common import precision_record
from attacks.kernels import PreparedModel
from common.errors import InputError
from common.memory import KeepFreedMemory
from frequency.subspaces import SubspaceFamily
from margins.inputs import gather_samples
from margins.settings import DTYPES, AttackSettings, RunSettings
from margins.store.chunks import ChunkStore, fingerprint_digest
from margins.store.disk import disk_full, disk_full_error
from margins.store.names import bound
from margins.store.results import (
    OPTIONAL_FILES,
    RESULT_FILES,
    MarginReport,
    json_safe,
    remove_stale_tmp_dirs,
    report_bytes,
)

CHUNK_DIR = "chunks"


# ---- rows, chunks and shares: how the (sample, subspace) rows are cut and split over processes ---------------
def shard_range(total: int, rank: int, world_size: int) -> range:
    """Rows `[rank * total // world_size, (rank + 1) * total // world_size)` of `range(total)`.

    Every row belongs to exactly one rank; shard lengths differ by at most one; a rank may get no rows when
    `total < world_size`. Contiguous shards keep each rank's rows on few samples (rows are sample-major).
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    return range(rank * total // world_size, (rank + 1) * total // world_size)


def row_grid(num_samples: int, num_subspaces: int, rows: range | None = None) -> tuple[list[int], list[int]]:
    """Sample-major rows: row `i` is (sample `i // num_subspaces`, subspace `i % num_subspaces`).

    Returns `(sample_index, subspace_index)` lists for `rows` (default: all `num_samples * num_subspaces`).
    """
    rows = range(num_samples * num_subspaces) if rows is None else rows
    return [i // num_subspaces for i in rows], [i % num_subspaces for i in rows]


def chunk_ranges(total: int, chunk_rows: int) -> list[range]:
    """`range(total)` cut into consecutive chunks of `chunk_rows` rows (the last may be shorter).

    Chunks are the unit of work and of bit-reproducibility: a chunk is always attacked as one batch, so its
    float results do not depend on how many processes share the work (`shard_range(len(chunks), rank, world)`
    gives each rank its chunk numbers) or on which chunks were already done before a resume.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    return [range(start, min(start + chunk_rows, total)) for start in range(0, total, chunk_rows)]


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
    figure: bool = True  # the paper's plot in the result folder (not for 2-D grids)
    started: float = dataclasses.field(default_factory=time.perf_counter)  # `seconds` of the report count from here
    attack: AttackSettings | None = None  # the settings the job was made with, `chunk_rows` given


class ChunkDataset(Dataset):
    """Item i = chunk `ids[i]`: its distinct samples `x: [n, C, H, W]`, labels `y: [n]`, and per row the position
    of its sample in x (`local`) and its subspace (`subspace`); id -1 is a no-op item."""

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
    """The steps of a process on its chunks, whoever drives them: thread count and the prepared model (once per
    process), folder preparation (rank 0), the chunk loader, the attack of one chunk, its commit, the progress bar.
    The attack always runs in the job's dtype: mixed-precision autocast of a surrounding trainer is switched off."""

    def __init__(
        self, job: MarginJob, attack: AttackSettings, run: RunSettings, store: ChunkStore, chunks: list[range]
    ):
        self.job, self.attack_settings, self.run, self.store, self.chunks = job, attack, run, store, chunks
        self.fingerprint = fingerprint_digest(job.fingerprint)  # every committed chunk carries it
        self.engine = attack.engine()
        self.prepared: PreparedModel | None = None
        self.progress: _Progress | None = None

    @contextlib.contextmanager
    def process(self, device: torch.device) -> Iterator[None]:
        """Inside the block this process attacks: CPU threads pinned to `run.threads` (restored after), glibc's
        malloc keeping freed blocks when asked (`KeepFreedMemory`, restored after), the model prepared for
        `device`."""
        cpu = torch.device(device).type == "cpu"
        if cpu and (self.run.threads is None or self.run.threads < 1):
            raise InputError(f"threads must be >= 1 (RunSettings.resolved), got {self.run.threads}")
        saved = torch.get_num_threads()
        if cpu:
            torch.set_num_threads(self.run.threads)
        try:
            with KeepFreedMemory(self.run.keep_freed_memory):
                with torch.inference_mode(False):
                    self.prepared = self.engine.prepare(self.job.model, device)
                yield
        finally:
            self.prepared = None
            torch.set_num_threads(saved)

    def prepare_folder(self) -> list[int]:
        """Rank 0: reset (overwrite) or verify, write the manifest, report damaged chunks; the pending ids."""
        job, store = self.job, self.store
        if self.run.overwrite:
            store.reset()
            for name in (*RESULT_FILES, *OPTIONAL_FILES):
                (job.output_dir / name).unlink(missing_ok=True)
        store.check_compatible(job.fingerprint)
        manifest = {"fingerprint": job.fingerprint, "settings": job.settings, "num_chunks": len(self.chunks)}
        store.initialise(json_safe(manifest, "manifest"))
        remove_stale_tmp_dirs(job.output_dir, older_than=0.0)
        scan = store.scan(self.chunks, self.fingerprint)
        for line in scan.warnings():
            print(f"warning: {line}", file=sys.stderr)
        return [c for c in range(len(self.chunks)) if c not in scan.committed]

    def start_progress(self, pending: list[int], description: str = "margins (sample, subspace) rows") -> None:
        """Rank 0's bar over all rows (`run.progress`)."""
        if self.run.progress:
            self.progress = _Progress(self.store, self.chunks, pending, description)

    def close_progress(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None

    def loader(self, ids: list[int], device: torch.device) -> DataLoader:
        """One item per chunk id (-1: a no-op item), read by `run.num_workers` workers."""
        data = ChunkDataset(self.job.dataset, self.job.indices, len(self.job.subspaces), self.chunks, ids)
        return DataLoader(
            data,
            batch_size=1,
            shuffle=False,
            collate_fn=_unwrap,
            num_workers=self.run.num_workers,
            pin_memory=torch.device(device).type == "cuda",
        )

    def attack(self, batch: dict[str, Any], device: torch.device) -> dict[str, Any] | None:
        """The engine on one chunk: `{"chunk", "arrays" (its rows, numpy), "seconds"}`; None for a no-op item."""
        if batch["chunk"] < 0:
            return None
        if self.prepared is None:
            raise RuntimeError("ChunkWork.attack runs inside `with work.process(device):`")
        device = torch.device(device)
        x = batch["x"].to(device)
        local, subspace = batch["local"].to(device), batch["subspace"].to(device)
        start = time.perf_counter()
        with torch.autocast(device.type, enabled=False):  # margins in the job's dtype whatever the trainer's
            out = self.engine.attack_rows(self.prepared, x, self.job.subspaces, local, subspace)
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

    def commit(self, prediction: dict[str, Any] | None, rank: int) -> None:
        """Commit an attacked chunk (atomic file + journal line); a full disk is an InputError naming the folder
        and the space the run still needs."""
        if prediction is None:
            return
        try:
            self.store.commit(prediction["chunk"], prediction["arrays"], rank, self.fingerprint, prediction["seconds"])
        except OSError as err:
            if disk_full(err):
                raise disk_full_error(self.store.root, self.bytes_needed()) from err
            raise

    def bytes_needed(self) -> int:
        """About how many bytes the run still writes (`bytes_to_write`)."""
        return bytes_to_write(self.job, self.store, self.chunks, self.attack_settings.precision)


class _Progress:
    """Rank 0's overall bar: rows committed by any rank (polled from the chunk folder), restored rows included."""

    def __init__(self, store: ChunkStore, chunks: list[range], pending: list[int], description: str, interval=0.5):
        from tqdm.auto import tqdm

        self.store, self.chunks, self.pending = store, chunks, set(pending)
        total = chunks[-1].stop if chunks else 0
        restored = total - sum(len(chunks[c]) for c in self.pending)
        self.bar = tqdm(total=total, initial=restored, unit="row", desc=description, file=sys.stderr)
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


def record_device(job: MarginJob, device_type: str, threads: int) -> None:
    """The device type, and on the CPU the thread count (BLAS/oneDNN reductions are split by thread: the count
    changes the float bits), in the job's settings and fingerprint."""
    job.fingerprint["device_type"] = job.settings["device_type"] = device_type
    if device_type == "cpu":
        if threads < 1:
            raise InputError(f"threads must be >= 1, got {threads}")
        job.fingerprint["cpu_threads"] = job.settings["cpu_threads"] = threads


def bytes_to_write(job: MarginJob, store: ChunkStore, chunks: list[range], dtype: str) -> int:
    """About how many bytes a run still writes: each chunk not on disk yet (exactly: `ChunkStore.bytes_per_chunk`)
    and the result files (`margins.store.results.report_bytes`)."""
    pending = [len(rows) for c, rows in enumerate(chunks) if not (store.root / store.chunk_name(c)).is_file()]
    sizes = {rows: store.bytes_per_chunk(rows, dtype) for rows in set(pending)}
    return sum(sizes[rows] for rows in pending) + report_bytes(len(job.subspaces), len(job.indices), job.settings,
                                                               job.figure)  # fmt: skip


def summary_extra(
    iterations: np.ndarray, predicted: np.ndarray, targets: np.ndarray, seconds: float
) -> dict[str, float | int]:
    """Derived `extra` fields of a report: clean accuracy, seconds, number of samples, mean/max iterations."""
    return {
        "clean_accuracy": float((predicted == targets).mean()) if len(targets) else float("nan"),
        "seconds": float(seconds),
        "num_samples": int(len(targets)),
        "mean_iterations": float(iterations.mean()) if iterations.size else 0.0,
        "max_iterations": int(iterations.max()) if iterations.size else 0,
    }


def wait_for_chunks(store: ChunkStore, chunks: list[range], fingerprint: str, poll: float = 0.5) -> None:
    """Rank 0, its own share done: wait until every chunk is committed by some rank (the other ranks' progress is
    read from their journals; the watchdog ends the process if a rank is lost or the run stops)."""
    while len(set(store.listed()) & set(range(len(chunks)))) < len(chunks):
        time.sleep(poll)
    scan = store.scan(chunks, fingerprint)
    if len(scan.committed) < len(chunks):
        raise RuntimeError(f"chunks of {store.root} failed their check after the run: {'; '.join(scan.warnings())}")


def to_float32(values: np.ndarray, round_down: bool = False) -> np.ndarray:
    """`values` as float32: rounded to nearest, or (`round_down`, for certified lower bounds, which must stay
    proven) to the largest float32 not above each value."""
    out = np.asarray(values).astype(np.float32)
    if round_down:
        above = out.astype(np.float64) > np.asarray(values, dtype=np.float64)
        out[above] = np.nextafter(out[above], np.float32(-np.inf))
    return out


def merge_chunks(job: MarginJob, store: ChunkStore, chunks: list[range]) -> MarginReport:
    """Rank 0: every committed chunk into `[S, N]` arrays (float32 margins) and the report; its `seconds` count
    from the job's start (loading included) to now."""
    num_subspaces, num_samples = len(job.subspaces), len(job.indices)
    grid = (num_samples, num_subspaces)  # sample-major rows
    margins = np.zeros(grid, np.float32)
    converged = np.zeros(grid, bool)
    iterations, perturbed = np.zeros(grid, np.int64), np.zeros(grid, np.int64)
    predicted, targets = np.zeros(num_samples, np.int64), np.zeros(num_samples, np.int64)
    fingerprint = fingerprint_digest(job.fingerprint)
    lower = bound(job.settings.get("estimator")) == "lower"
    for c, rows in enumerate(chunks):
        data = store.load(c, rows, fingerprint)
        sl = slice(rows.start, rows.stop)
        margins.reshape(-1)[sl] = to_float32(data["margins"], round_down=lower)
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
            **summary_extra(iterations, predicted, targets, time.perf_counter() - job.started),
            "num_chunks": len(chunks),
            "engine_seconds": store.engine_seconds(len(chunks)),
        },
    )
