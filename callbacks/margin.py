"""Measure margins along the DCT subspaces during training (and validate / test runs); log them to TensorBoard.

What it shows in TensorBoard (layout, scalars, images, HPARAMS) is `callbacks.tensorboard`.

Terminal (rank 0): a bar over the (sample, subspace) rows while measuring, then a summary (`summary_lines`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks.tensorboard import (
    BoardState,
    accuracy,
    band_medians,
    band_size,
    log_measurement,
    log_step,
    median_tags,
)
from callbacks.tensorboard import describe_module as _describe
from callbacks.tensorboard import tensorboard_logger as _tensorboard_logger
from common.errors import InputError
from common.stop import RunStopped, stop_handled
from margins.run.evaluate import fingerprint_of, make_job, measure_chunks, state_sha256
from margins.run.guard import EXIT_BAD_INPUT, EXIT_BUG, FolderLock, Watchdog
from margins.run.work import CHUNK_DIR, ChunkWork, MarginJob, chunk_ranges, record_device, shard_range
from margins.settings import AttackSettings, RowSettings, RunSettings
from margins.store.chunks import ChunkStore, ResumeMismatchError
from margins.store.names import differing, estimator_of, quantity
from margins.store.results import SUMMARY_FILE, MarginReport

ON_ERROR = ("raise", "skip")  # what a failed measurement does in a fit (`on_error`)


def config_error(err: InputError, section: str) -> InputError:
    """A settings object's error with the commands' flags (`--num-samples`) as train.py's options
    (`--margin.rows.num_samples`): the same names, under the callback's `section`."""
    return InputError(re.sub(r"--([a-z][a-z-]*)", lambda m: f"--margin.{section}.{m[1].replace('-', '_')}", str(err)))


class MarginCallback(L.Callback):
    """Runs batched subspace DeepFool on a fixed evaluation subset at the end of validation / test epochs.

    Args:
        rows: which (sample, subspace) rows (`margins.settings.RowSettings`, config `margin.rows.*`, the commands'
            flag names): `num_samples` samples of `datamodule.margin_dataset()` (the test split) drawn with `seed`,
            the same ones every time (at most the split's size), along the family `subspace` (default the DCT blocks
            of the datamodule's `subspace_block` / `subspace_step`, the paper's).
        attack: how (`margins.settings.AttackSettings`, `margin.attack.*`): the estimator ("deepfool", the paper's,
            or "fmn": margins, upper bounds; "certify": certified lower bounds) and its settings, `chunk_rows`
            (rows per chunk, attacked as one batch: the unit shared out under DDP), precision and kernels.
        threads: CPU threads while measuring (default 1: pinned, so 1 and k processes agree bit for bit, and the
            training's own threads are left alone; float bits depend on the count).
        every_n_epochs: measure every N validation epochs during `fit` (always in `validate` / `test` runs).
        measure_at_fit_end: also measure the final model when `fit` ends (last epoch, EarlyStopping, max_time),
            unless the last validation already measured it.
        on_test: also measure at the end of `test` runs.
        band_width: subspaces in the low and in the high band (capped at half the subspaces).
        log_figure: log the paper's plot `margin/distribution` and the history image `margin/evolution`.
        progress: a progress bar on rank 0 while measuring (the summary after each measurement is always printed).
        enabled: False turns the callback off (`--margin.enabled false`).
        on_error: a measurement that fails on any rank stops on every rank (the chunk folder's stop file), then
            "raise": raises through Lightning, which ends the run as for any exception (the last checkpoint stays,
            `--ckpt_path` resumes); "skip": one warning line, no result for this measurement, training goes on.
            A stop of the run (a signal, a lost process) always raises.

    The measurement runs the chunk work of `evaluate_margin.py` (`margins.run.work.ChunkWork`): the rows are cut into
    chunks of `chunk_rows` sample-major rows, each rank attacks its contiguous share of the pending chunks (each
    chunk alone, with only its own samples) and commits them to `<log_dir>/margins/<run>/chunks/`, and rank 0
    merges them into the same result files, so results are bit-identical for any number of processes and equal
    `evaluate_margin.py` on the same weights. Nothing is ever removed: a run folder holding another measurement
    (other weights or settings) is kept, and this one goes to the first free or compatible `<run>-2`, `<run>-3`,
    ... next to it (one note line); a folder of this very measurement is resumed. Rank 0 chooses the folder before
    any rank works in it and holds its lock (`margins.run.guard.FolderLock`) until the results are written. The
    margins are computed in float32 whatever the trainer's precision (mixed-precision autocast is switched off
    around the attack). Only rank 0 writes the report and logs to TensorBoard. The median history
    (`margin/evolution`) is part of `state_dict`, so a resumed run keeps it.
    """

    def __init__(
        self,
        rows: RowSettings = RowSettings(),
        attack: AttackSettings = AttackSettings(),
        threads: int = 1,
        every_n_epochs: int = 1,
        measure_at_fit_end: bool = True,
        on_test: bool = True,
        band_width: int = 3,
        log_figure: bool = True,
        progress: bool = True,
        enabled: bool = True,
        on_error: str = "raise",
    ):
        for name, value in (("every_n_epochs", every_n_epochs), ("band_width", band_width), ("threads", threads)):
            if value < 1:
                raise InputError(f"margin.{name} must be >= 1, got {value} (--margin.{name})")
        for section, settings in (("rows", rows), ("attack", attack)):
            try:
                settings.check()
            except InputError as err:
                raise config_error(err, section) from None
        self.rows, self.attack = rows, attack
        self.every_n_epochs, self.on_test, self.measure_at_fit_end = every_n_epochs, on_test, measure_at_fit_end
        self.band_width = band_width
        self.threads, self.log_figure, self.progress, self.enabled = threads, log_figure, progress, enabled
        if on_error not in ON_ERROR:
            raise InputError(
                f"margin.on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r} (--margin.on_error)"
            )
        self.on_error = on_error
        self.history: dict[int, list[float]] = {}  # epoch -> median margin per subspace
        self._reset_fit_state()

    def _reset_fit_state(self) -> None:
        self._train_epoch = 0
        self._last_val: tuple[int, int, int] | None = None  # (global_step, epoch, log step) of the last validation
        self._measured_global_step: int | None = None
        self._board = BoardState()  # what rank 0 has written to TensorBoard

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
            epoch = trainer.current_epoch
            self.measure(trainer, pl_module, f"test_epoch_{epoch:03d}", log_step(trainer), None, epoch)

    # ---- work --------------------------------------------------------------------------------------------
    def measure(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        run_name: str,
        step: int | None = None,
        epoch: int | None = None,
        folder_epoch: int | None = None,
    ) -> Path | None:
        """Measure on every rank (each its share of the chunks), merge, write and log on rank 0 at `step` (default:
        the current Lightning log step); `epoch` given: record the medians in the history. Must be called on every
        rank. Returns the output dir on rank 0. A failure raises, or with `on_error: skip` is one warning line
        (rank 0) and returns None; a stop of the run (`RunStopped`: a signal, a lost process) raises."""
        try:
            return self._measure(trainer, pl_module, run_name, step, epoch, folder_epoch)
        except RunStopped as stop:
            if self.on_error != "skip" or stop.code not in (EXIT_BUG, EXIT_BAD_INPUT):
                raise
            stop_handled(stop)  # another rank's failure: this process goes on
            reason = stop.message
        except Exception as err:
            if self.on_error != "skip":
                raise
            reason = failure(err, trainer.global_rank)
        if trainer.is_global_zero:
            print(f"warning: margins {run_label(run_name)} skipped ({reason}); training goes on (margin.on_error: "
                  "skip)", file=sys.stderr, flush=True)  # fmt: skip
        return None

    def _measure(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        run_name: str,
        step: int | None,
        epoch: int | None,
        folder_epoch: int | None,
    ) -> Path | None:
        start = time.perf_counter()
        step = log_step(trainer) if step is None else step
        base = Path(trainer.log_dir or trainer.default_root_dir) / "margins" / run_name  # a broadcast: all ranks
        job = self._job(trainer, pl_module, base, run_name, epoch if epoch is not None else folder_epoch)
        record_device(job, pl_module.device.type, self.threads)
        with contextlib.ExitStack() as lock:  # rank 0: the folder's lock, held until its results are written
            job.output_dir = self._folder(trainer, job, lock)
            report = self._attack(trainer, pl_module, job, run_name)
            if report is None:
                return None  # no collective: this rank goes on training, rank 0 merges what every rank committed
            if epoch is not None:
                self.history[epoch] = np.median(report.margins, axis=1).tolist()
        logger = _tensorboard_logger(trainer)
        if logger is not None:
            self._log_tensorboard(trainer, pl_module, logger, report, job.title, job.output_dir.name, step,
                                  run_label(run_name))  # fmt: skip
        seconds = time.perf_counter() - start
        terminal_print(summary_lines(report, self.band_width, run_label(run_name), seconds, job.output_dir))
        return job.output_dir

    def _folder(self, trainer: L.Trainer, job: MarginJob, lock: contextlib.ExitStack) -> Path:
        """The measurement's folder on every rank, chosen and locked (into `lock`) by rank 0 before any rank works
        in it (`choose_folder`); a failure there stops every rank (a `RunStopped` on the others)."""
        if not trainer.is_global_zero:
            folder, code, reason = trainer.strategy.broadcast(None, src=0)
            if folder is None:
                raise RunStopped(code, reason)
            return Path(folder)
        try:
            folder = choose_folder(job.output_dir, job.fingerprint, lock)
        except BaseException as err:
            trainer.strategy.broadcast((None, *stop_of(err)), src=0)
            raise
        trainer.strategy.broadcast((str(folder), 0, ""), src=0)
        return folder

    def _attack(
        self, trainer: L.Trainer, pl_module: L.LightningModule, job: MarginJob, run_name: str
    ) -> MarginReport | None:
        """Every rank attacks its share of the pending chunks of `job.output_dir`, as the commands do
        (`margins.run.evaluate.measure_chunks`); rank 0 merges them and writes the results (None on the other ranks)."""
        device = pl_module.device
        store = ChunkStore(job.output_dir / CHUNK_DIR)
        chunks = chunk_ranges(len(job.indices) * len(job.subspaces), job.attack.chunk_rows)
        run = RunSettings(threads=self.threads, progress=self.progress and trainer.is_global_zero)
        work = ChunkWork(job, job.attack, run, store, chunks)
        rank = trainer.global_rank

        def attack_share(watchdog: Watchdog) -> None:  # the fit's ranks, no new processes
            pending = trainer.strategy.broadcast(work.prepare_folder() if trainer.is_global_zero else None, src=0)
            mine = [pending[i] for i in shard_range(len(pending), rank, trainer.world_size)]
            if trainer.is_global_zero:
                work.start_progress(pending, f"margins {run_label(run_name)}: (sample, subspace) rows")
            try:
                for batch in work.loader(mine, device):
                    work.commit(work.attack(batch, device), rank)
            finally:
                work.close_progress()

        with torch.inference_mode(False), work.process(device):
            return measure_chunks(work, rank, trainer.world_size, attack_share)

    def _job(
        self, trainer: L.Trainer, pl_module: L.LightningModule, out_dir: Path, run_name: str, epoch: int | None
    ) -> MarginJob:
        datamodule = trainer.datamodule
        dataset = datamodule.margin_dataset()
        name = getattr(datamodule, "name", type(datamodule).__name__)
        rows = dataclasses.replace(self.rows, num_samples=min(self.rows.num_samples, len(dataset)))
        indices, subspaces = rows.indices(len(dataset), name), rows.family(datamodule)
        model = pl_module.model
        settings = {
            "source": "MarginCallback",
            "run": run_name,
            "epoch": epoch,
            "global_step": trainer.global_step,
            "world_size": trainer.world_size,
            "trainer_precision": str(trainer.precision),
            "model": _public(pl_module.hparams),
            "data": _public(datamodule.hparams),
            "checkpoint_sha256": state_sha256(model),
            "dataset": name,
            "transform": datamodule.hparams.get("transform", "none"),
            **rows.record(),
        }
        title = f"{_describe(pl_module, datamodule)}, {run_label(run_name)}"
        attack = self.attack.resolved(name)
        return make_job(model, dataset, indices, subspaces, out_dir, attack, settings, title)

    # ---- TensorBoard (rank 0 only: no collectives below) -------------------------------------------------
    def _log_tensorboard(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        logger: TensorBoardLogger,
        report: MarginReport,
        title: str,
        run: str,
        step: int,
        label: str,
    ) -> None:
        history = self.history if self.log_figure else None
        log_measurement(logger, trainer, pl_module, report, title, run, label, step, state=self._board,
                        band_width=self.band_width, num_samples=self.rows.num_samples, history=history)  # fmt: skip


# ---- the measurement's folder (rank 0) -------------------------------------------------------------------------
def choose_folder(base: Path, fingerprint: dict[str, Any], lock: contextlib.ExitStack) -> Path:
    """`base` when it is free or holds this very measurement (`fingerprint`: resumed), else the first such
    `<base>-2`, `<base>-3`, ... next to it, with one note line; the folder is locked (`FolderLock`) until `lock`
    closes. Nothing is ever removed."""
    skipped: list[tuple[Path, str]] = []
    for n in itertools.count(1):
        folder = base if n == 1 else base.with_name(f"{base.name}-{n}")
        held = other_measurement(folder, fingerprint)
        if held is None:
            held = _lock_unless_other(folder, fingerprint, lock)
        if held is None:
            if skipped:
                print(folder_note(skipped, folder), file=sys.stderr, flush=True)
            return folder
        skipped.append((folder, held))
    raise AssertionError("unreachable")


def _lock_unless_other(folder: Path, fingerprint: dict[str, Any], lock: contextlib.ExitStack) -> str | None:
    """Lock `folder` into `lock` unless, once locked, it holds another measurement: then what it holds. A folder
    another process keeps past the lock's wait is passed over only if it holds another measurement."""
    with contextlib.ExitStack() as attempt:
        try:
            attempt.enter_context(FolderLock(folder))
        except InputError:
            if (held := other_measurement(folder, fingerprint)) is None:
                raise
            return held
        held = other_measurement(folder, fingerprint)  # written while this process waited for the lock
        if held is None:
            lock.enter_context(attempt.pop_all())
        return held


def other_measurement(folder: Path, fingerprint: dict[str, Any]) -> str | None:
    """What `folder` holds when it is not free for the measurement `fingerprint` (a chunks manifest or result files
    of other weights or settings, something unreadable, a file), else None: free, or this very measurement."""
    if folder.exists() and not folder.is_dir():
        return "a file, not a folder"
    now = json.loads(json.dumps(fingerprint))
    try:
        manifest = ChunkStore(folder / CHUNK_DIR).read_manifest()
    except ResumeMismatchError:
        return "an unreadable chunks manifest"
    if manifest is not None and differing(manifest["fingerprint"], now):
        return describe_other(manifest["fingerprint"], now)
    if not (folder / SUMMARY_FILE).is_file():
        return None
    try:
        there = fingerprint_of(json.loads((folder / SUMMARY_FILE).read_text())["settings"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"an unreadable {SUMMARY_FILE}"
    there = {k: there.get(k) for k in now}  # the result files add the device's name and precision
    return describe_other(there, now) if differing(there, now) else None


def describe_other(before: dict[str, Any], now: dict[str, Any], limit: int = 3) -> str:
    """Another measurement in brief: its values, its weights (a SHA-256 prefix) and the first `limit` other
    settings that differ, e.g. "DeepFool margins of weights 1a2b3c4d5e6f; num_samples 4 (now 6)"."""
    weights, these = (str(f.get("checkpoint_sha256"))[:12] for f in (before, now))
    text = f"{quantity(estimator_of(before))}s of weights {weights}" + ("" if weights == these else f" (now {these})")
    changes = _changes(before, now)
    changes.sort(key=lambda c: (c[0] != "estimator", c[0].endswith("_sha256")))
    shown = "; ".join(f"{k} {_short(a)} (now {_short(b)})" for k, a, b in changes[:limit])
    more = f" (+{len(changes) - limit} more)" if len(changes) > limit else ""
    return text + (f"; {shown}{more}" if shown else "")


def _changes(before: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, there, now) for each differing setting but the weights; one level into dicts (`model.lr`)."""
    out = []
    for key in differing(before, now):
        a, b = before.get(key), now.get(key)
        if key == "checkpoint_sha256":
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += [(f"{key}.{sub}", a.get(sub), b.get(sub)) for sub in differing(a, b)]
        else:
            out.append((key, a, b))
    return out


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:21] + "..."


def folder_note(skipped: list[tuple[Path, str]], folder: Path) -> str:
    """ "note: <first> holds another measurement (<what>)[; so does/do <the others>]; this one goes to <folder>"."""
    (first, held), others = skipped[0], [p.name for p, _ in skipped[1:]]
    also = f"; so does {others[0]}" if len(others) == 1 else f"; so do {others[0]} to {others[-1]}" if others else ""
    return f"note: {first} holds another measurement ({held}){also}; this one goes to {folder}"


def stop_of(err: BaseException) -> tuple[int, str]:
    """The exit status and one-line reason with which the other ranks stop for rank 0's `err`."""
    if isinstance(err, RunStopped):
        return err.code, err.message
    return (EXIT_BAD_INPUT if isinstance(err, InputError) else EXIT_BUG), failure(err, 0)


def failure(err: BaseException, rank: int) -> str:
    """ "rank R failed: <type>: <message>" on one line."""
    return f"rank {rank} failed: {type(err).__name__}: {' '.join(str(err).split())[:300]}"


def run_label(run_name: str) -> str:
    """ "epoch 3" for the folder `epoch_003`, "test, epoch 0" for `test_epoch_000` (others unchanged)."""
    stage, _, number = run_name.rpartition("_")
    if not number.isdigit() or not stage.endswith("epoch"):
        return run_name
    prefix = stage.removesuffix("epoch").strip("_").replace("_", " ")
    return f"{prefix + ', ' if prefix else ''}epoch {int(number)}"


def summary_lines(report: MarginReport, band_width: int, label: str, seconds: float, folder: Path) -> list[str]:
    """The terminal block after a measurement: band medians and their ratio, clean accuracy, not-converged rows,
    seconds and the result folder."""
    margins = np.asarray(report.margins)
    num_subspaces, num_samples = margins.shape
    width = band_size(num_subspaces, band_width)
    low, high = band_medians(margins, band_width)
    ratio = f"{high / low:.3g}" if low > 0 else "n/a (low-band median 0)"
    missed = int((~np.asarray(report.converged)).sum())
    return [
        f"margins {label}: {num_samples} samples x {num_subspaces} subspaces in {seconds:.1f} s -> {folder}",
        f"  median margin (L2): low band (subspaces 0-{width - 1}) {low:.3g}, high band "
        f"({num_subspaces - width}-{num_subspaces - 1}) {high:.3g}, high/low {ratio}",
        f"  clean accuracy {accuracy(report):.1%}, not converged {missed} of {margins.size} rows",
    ]


def terminal_print(lines: list[str]) -> None:
    """Print `lines` to stdout above the progress bars on the terminal (Lightning's and the margin bar: tqdm
    clears them, prints, draws them again), so that no bar is cut by the text."""
    from tqdm.auto import tqdm

    tqdm.write("\n".join(lines), file=sys.stdout)
    sys.stdout.flush()


def _public(hparams: Any) -> dict[str, Any]:
    """hparams without private keys (LightningCLI adds `_instantiator`)."""
    return {k: v for k, v in dict(hparams).items() if not str(k).startswith("_")}


__all__ = [
    "MarginCallback",
    "band_medians",
    "log_step",
    "median_tags",
    "run_label",
    "summary_lines",
]
