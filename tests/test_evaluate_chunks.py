"""margins.chunks: what counts as committed after a kill at any moment, and the resume check.

Reference: states built by hand on disk (a cut journal line, an unlisted file, changed bytes, a missing file).
"""

from __future__ import annotations

import numpy as np
import pytest

from margins.chunks import CHUNK_FIELDS, ChunkStore, ResumeMismatchError


def _arrays(start: int, stop: int) -> dict[str, np.ndarray]:
    n = stop - start
    data = {k: np.arange(start, stop, dtype=np.int64) for k in CHUNK_FIELDS}
    data["margins"], data["converged"] = np.linspace(0, 1, n), np.ones(n, bool)
    data["rows"] = np.array([start, stop])
    return data


def test_commit_scan_and_load(tmp_path):
    store = ChunkStore(tmp_path / "chunks")
    store.initialise({"fingerprint": {"max_iter": 4}})
    for c in range(3):
        store.commit(c, _arrays(4 * c, 4 * c + 4), rank=c % 2)
    scan = store.scan(3)
    assert scan.committed == {0, 1, 2} and scan.problems == []
    np.testing.assert_array_equal(store.load(1)["margins"], _arrays(4, 8)["margins"])
    assert sorted(p.name for p in store.root.glob("journal-*")) == ["journal-rank0.jsonl", "journal-rank1.jsonl"]


def test_states_a_kill_can_leave(tmp_path):
    store = ChunkStore(tmp_path / "chunks")
    store.initialise({"fingerprint": {}})
    for c in range(4):
        store.commit(c, _arrays(c, c + 1), rank=0)
    journal = store.root / "journal-rank0.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # kill mid-line: chunk 3 is not listed
    (store.root / ".chunk-000009.npz.tmp-dead").write_bytes(b"half")  # kill mid-write
    path1 = store.root / store.chunk_name(1)
    path1.write_bytes(path1.read_bytes()[:-3] + b"xyz")  # damaged after commit
    (store.root / store.chunk_name(2)).unlink()  # lost after commit
    scan = store.scan(4)
    assert scan.committed == {0}
    assert len(scan.problems) == 2 and "corrupt" in scan.problems[0] and "missing" in scan.problems[1]
    store.commit(3, _arrays(3, 4), rank=0)  # appended after the cut line, on its own line
    assert store.scan(4).committed == {0, 3}
    store.initialise({"fingerprint": {}})
    assert not list(store.root.glob(".*.tmp-*"))


def test_resume_with_other_settings_names_the_difference(tmp_path):
    store = ChunkStore(tmp_path / "run" / "chunks")
    store.initialise({"fingerprint": {"max_iter": 4, "dtype": "float32", "chunk_rows": 8}})
    store.check_compatible({"max_iter": 4, "dtype": "float32", "chunk_rows": 8})
    with pytest.raises(ResumeMismatchError, match=r"dtype: \"float32\" there, \"float64\" now.*--overwrite"):
        store.check_compatible({"max_iter": 4, "dtype": "float64", "chunk_rows": 8})
