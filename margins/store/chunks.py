"""Committed chunks of a margin evaluation on disk: resumable, consistent after a kill at any moment.

Layout of `<output_dir>/chunks/`:
    manifest.json          every setting of the run and the checkpoint's SHA-256; written once (atomically) by
                           rank 0 before any work. A resume compares its `fingerprint` with the new run's.
    chunk-000012.npz       the rows of chunk 12 (`margins`, `converged`, `iterations`, `perturbed_labels`,
                           `predicted`, `targets`), which rows they are (`rows` = [start, stop)) and which run wrote
                           them (`fingerprint`, the SHA-256 of the run's settings: `fingerprint_digest`); written to
                           `.chunk-000012.npz.tmp-<uuid>`, fsynced, then `os.replace`d (atomic) and the directory
                           fsynced.
    journal-rank<r>.jsonl  one line per chunk committed by rank r: {"chunk", "file", "sha256", "fingerprint"} (and
                           "seconds" in the engine), appended and fsynced AFTER the chunk file is in place.
A chunk counts as committed only when a journal line lists it, the file's SHA-256 matches that line, and the file
itself says it holds the expected rows of this run (its fingerprint). So a chunk of another run (other settings,
other checkpoint, other samples: a folder whose manifest was deleted, a file copied in) is never merged.

A kill before the journal line leaves an unlisted file (recomputed, overwritten atomically); a kill mid-line leaves
an unparsable line (ignored); a listed file whose bytes changed (disk or user damage) or that belongs to another
run is reported in one line and recomputed. Nothing else is ever deleted, except by `reset` (overwrite).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InputError
from margins.store.names import describe_held, differing

MANIFEST = "manifest.json"
CHUNK_FIELDS = ("margins", "converged", "iterations", "perturbed_labels", "predicted", "targets", "rows")
ROW_FIELDS = CHUNK_FIELDS[:-1]  # one value per row


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """SHA-256 of a run's fingerprint (its canonical JSON): what every chunk of the run carries."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


class ResumeMismatchError(InputError):
    """The folder holds a run with other settings or another checkpoint."""


class ChunkError(ValueError):
    """A chunk file that cannot be merged: `reason` says why (no path)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path} {reason}")
        self.reason = reason


@dataclass
class ChunkScan:
    """What is on disk: committed chunk ids (file verified), and the damaged ones as (path, what is wrong)."""

    committed: set[int]
    problems: list[tuple[Path, str]]

    def warnings(self) -> list[str]:
        """One line per kind of damage, naming the chunks ("recomputing" them)."""
        kinds: dict[str, list[Path]] = {}
        for path, reason in self.problems:
            kinds.setdefault(reason, []).append(path)
        lines = []
        for reason, paths in kinds.items():
            if len(paths) == 1:
                lines.append(f"{paths[0]} {reason}; recomputing it")
            else:
                names = ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
                lines.append(f"{len(paths)} chunks in {paths[0].parent} ({names}): each {reason}; recomputing them")
        return lines


class ChunkStore:
    """The chunk folder of one evaluation (see the module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- manifest --------------------------------------------------------------------------------------
    def read_manifest(self) -> dict[str, Any] | None:
        """The manifest (a dict with a "fingerprint" dict), None when there is none; ResumeMismatchError when the
        file is not one."""
        path = self.root / MANIFEST
        if not path.is_file():
            return None
        try:
            manifest = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ResumeMismatchError(f"{path} is not valid JSON ({err}); overwrite the folder to start again") from err
        if not isinstance(manifest, dict) or not isinstance(manifest.get("fingerprint"), dict):
            raise ResumeMismatchError(
                f"{path} is not a manifest of a margin run (no settings in it); overwrite the folder to start again"
            )
        return manifest

    def check_compatible(self, fingerprint: dict[str, Any]) -> None:
        """Raise ResumeMismatchError naming the first differing settings if the folder holds another run."""
        manifest = self.read_manifest()
        if manifest is None:
            return
        before = manifest.get("fingerprint", {})
        now = json.loads(json.dumps(fingerprint))
        if differing(before, now):
            raise ResumeMismatchError(
                f"{self.root.parent} holds an unfinished evaluation: {describe_held(before, now)}; "
                "overwrite it (--overwrite, overwrite=True) to start again, or choose another output folder"
            )

    def initialise(self, manifest: dict[str, Any]) -> None:
        """Rank 0, before work: create the folder, drop stale temporary files, write the manifest if absent."""
        self.root.mkdir(parents=True, exist_ok=True)
        for tmp in self.root.glob(".*.tmp-*"):
            tmp.unlink(missing_ok=True)
        if not (self.root / MANIFEST).is_file():
            text = json.dumps(manifest, indent=2, sort_keys=True, allow_nan=False) + "\n"
            atomic_write(self.root / MANIFEST, text.encode())

    def reset(self) -> None:
        """Remove every chunk and the manifest (`--overwrite`)."""
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- chunks ----------------------------------------------------------------------------------------
    @staticmethod
    def chunk_name(chunk: int) -> str:
        return f"chunk-{chunk:06d}.npz"

    def commit(
        self, chunk: int, arrays: dict[str, np.ndarray], rank: int, fingerprint: str, seconds: float | None = None
    ) -> None:
        """Write chunk `chunk` (its rows' arrays and `rows`) with the run's `fingerprint` digest atomically, then
        append its journal line (fsynced); `seconds`: its engine time."""
        data = _chunk_file(arrays, fingerprint)
        name = self.chunk_name(chunk)
        atomic_write(self.root / name, data)
        _append_line(self.root / f"journal-rank{rank}.jsonl", _journal_line(chunk, data, fingerprint, seconds))

    @staticmethod
    def bytes_per_chunk(rows: int, margin_dtype: str = "float32") -> int:
        """What committing a chunk of `rows` rows writes: its file (exact, an uncompressed npz of fixed-size
        arrays) and its journal line."""
        arrays = {k: np.zeros(rows, np.int64) for k in CHUNK_FIELDS}
        arrays.update(margins=np.zeros(rows, margin_dtype), converged=np.zeros(rows, bool), rows=np.zeros(2, np.int64))
        data = _chunk_file(arrays, "0" * 64)
        return len(data) + len(_journal_line(10**6, data, "0" * 64, 1e-3 / 3)) + 1

    def load(self, chunk: int, rows: range, fingerprint: str) -> dict[str, np.ndarray]:
        """The arrays of chunk `chunk`, checked to hold `rows` of the run `fingerprint` (ChunkError otherwise, also
        for a file numpy cannot read)."""
        path = self.root / self.chunk_name(chunk)
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in (*CHUNK_FIELDS, "fingerprint") if k in data.files}
        except (OSError, ValueError, EOFError, KeyError) as err:
            raise ChunkError(path, f"cannot be read ({' '.join(str(err).split())})") from err
        if str(arrays.get("fingerprint", "")) != fingerprint:
            raise ChunkError(path, "was written by another run (other settings, checkpoint or samples)")
        missing = [k for k in CHUNK_FIELDS if k not in arrays]
        if missing or tuple(arrays["rows"].tolist()) != (rows.start, rows.stop):
            raise ChunkError(path, f"does not hold its rows [{rows.start}, {rows.stop}) of this run")
        if any(arrays[k].shape != (len(rows),) for k in ROW_FIELDS):
            raise ChunkError(path, f"holds arrays of the wrong length for its {len(rows)} rows")
        return arrays

    def journal(self) -> dict[int, dict[str, Any]]:
        """Chunk id -> its entry, from every journal line that parses (the last line for a chunk wins)."""
        entries: dict[int, dict[str, Any]] = {}
        for journal in sorted(self.root.glob("journal-*.jsonl")):
            for line in journal.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    entries[int(entry["chunk"])] = {**entry, "sha256": str(entry["sha256"])}
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    continue  # a line cut by a kill
        return entries

    def listed(self) -> dict[int, str]:
        """Chunk id -> SHA-256 from every journal line that parses (the last line for a chunk wins)."""
        return {chunk: entry["sha256"] for chunk, entry in self.journal().items()}

    def engine_seconds(self, num_chunks: int) -> float:
        """Seconds in the engine summed over the journal's chunks `0..num_chunks-1`: every process's and every
        earlier (resumed) run's, lines without seconds (older runs) counting 0."""
        entries = self.journal()
        total = 0.0
        for chunk in range(num_chunks):
            try:
                total += float(entries.get(chunk, {}).get("seconds", 0.0))
            except (TypeError, ValueError):
                continue
        return total

    def scan(self, chunks: list[range], fingerprint: str) -> ChunkScan:
        """Verify every listed chunk file (read-only): its checksum, and that it holds its rows of the run
        `fingerprint`."""
        committed, problems = set(), []
        for chunk, digest in sorted(self.listed().items()):
            if not 0 <= chunk < len(chunks):
                continue
            path = self.root / self.chunk_name(chunk)
            if not path.is_file():
                problems.append((path, "listed as committed but missing"))
                continue
            if _sha256(path) != digest:
                problems.append((path, "corrupt (its SHA-256 differs from the journal)"))
                continue
            try:
                self.load(chunk, chunks[chunk], fingerprint)
            except ChunkError as err:
                problems.append((path, err.reason))
                continue
            committed.add(chunk)
        return ChunkScan(committed, problems)

    def count_present(self) -> set[int]:
        """Chunk ids whose files exist (cheap, for the progress bar)."""
        ids = set()
        for path in self.root.glob("chunk-*.npz"):
            try:
                ids.add(int(path.stem.split("-")[1]))
            except (IndexError, ValueError):
                continue
        return ids


def _chunk_file(arrays: dict[str, np.ndarray], fingerprint: str) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, fingerprint=np.asarray(fingerprint), **{k: np.asarray(arrays[k]) for k in CHUNK_FIELDS})
    return buffer.getvalue()


def _journal_line(chunk: int, data: bytes, fingerprint: str, seconds: float | None) -> str:
    entry = {"chunk": chunk, "file": ChunkStore.chunk_name(chunk), "sha256": hashlib.sha256(data).hexdigest(),
             "fingerprint": fingerprint}  # fmt: skip
    if seconds is not None:
        entry["seconds"] = float(seconds)
    return json.dumps(entry)


def atomic_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` atomically: temporary sibling, fsync, os.replace, fsync of the directory."""
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def _append_line(path: Path, line: str) -> None:
    with open(path, "ab") as f:
        if f.tell() > 0 and not _ends_with_newline(path):
            f.write(b"\n")  # a previous line was cut by a kill: keep ours separate
        f.write(line.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
