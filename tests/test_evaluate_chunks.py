"""margins.store.chunks: what counts as committed after a kill at any moment, and the resume check.

Reference: states built by hand on disk (a cut journal line, an unlisted file, changed bytes, a missing file).
"""

from __future__ import annotations

import numpy as np
import pytest

from margins.store.chunks import CHUNK_FIELDS, ChunkStore, ResumeMismatchError

RUN = "0" * 64  # the fingerprint digest of the test's run


def _arrays(start: int, stop: int) -> dict[str, np.ndarray]:
    n = stop - start
    data = {k: np.arange(start, stop, dtype=np.int64) for k in CHUNK_FIELDS}
    data["margins"], data["converged"] = np.linspace(0, 1, n), np.ones(n, bool)
    data["rows"] = np.array([start, stop])
    return data


def test_commit_scan_and_load(tmp_path):
    store = ChunkStore(tmp_path / "chunks")
    store.initialise({"fingerprint": {"max_iter": 4}})
    chunks = [range(4 * c, 4 * c + 4) for c in range(3)]
    for c in range(3):
        store.commit(c, _arrays(4 * c, 4 * c + 4), rank=c % 2, fingerprint=RUN)
    scan = store.scan(chunks, RUN)
    assert scan.committed == {0, 1, 2} and scan.problems == []
    np.testing.assert_array_equal(store.load(1, chunks[1], RUN)["margins"], _arrays(4, 8)["margins"])
    assert sorted(p.name for p in store.root.glob("journal-*")) == ["journal-rank0.jsonl", "journal-rank1.jsonl"]


def test_states_a_kill_can_leave(tmp_path):
    store = ChunkStore(tmp_path / "chunks")
    store.initialise({"fingerprint": {}})
    chunks = [range(c, c + 1) for c in range(4)]
    for c in range(4):
        store.commit(c, _arrays(c, c + 1), rank=0, fingerprint=RUN)
    journal = store.root / "journal-rank0.jsonl"
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # kill mid-line: chunk 3 is not listed
    (store.root / ".chunk-000009.npz.tmp-dead").write_bytes(b"half")  # kill mid-write
    path1 = store.root / store.chunk_name(1)
    path1.write_bytes(path1.read_bytes()[:-3] + b"xyz")  # damaged after commit
    (store.root / store.chunk_name(2)).unlink()  # lost after commit
    scan = store.scan(chunks, RUN)
    assert scan.committed == {0}
    assert [reason.split(" ")[0] for _, reason in scan.problems] == ["corrupt", "listed"]
    assert len(scan.warnings()) == 2 and all("recomputing it" in line for line in scan.warnings())
    store.commit(3, _arrays(3, 4), rank=0, fingerprint=RUN)  # appended after the cut line, on its own line
    assert store.scan(chunks, RUN).committed == {0, 3}
    store.initialise({"fingerprint": {}})
    assert not list(store.root.glob(".*.tmp-*"))


def test_resume_with_other_settings_names_the_difference(tmp_path):
    store = ChunkStore(tmp_path / "run" / "chunks")
    store.initialise({"fingerprint": {"max_iter": 4, "dtype": "float32", "chunk_rows": 8}})
    store.check_compatible({"max_iter": 4, "dtype": "float32", "chunk_rows": 8})
    with pytest.raises(ResumeMismatchError, match=r"dtype: \"float32\" there, \"float64\" now.*--overwrite"):
        store.check_compatible({"max_iter": 4, "dtype": "float64", "chunk_rows": 8})


def test_chunks_of_another_run_or_other_rows_are_never_counted(tmp_path):
    """A chunk names its run (fingerprint digest) and its rows: a file of another run, or of other rows with its
    journal line edited to match, is reported and recomputed, never merged."""
    store = ChunkStore(tmp_path / "chunks")
    store.root.mkdir()
    chunks = [range(0, 4), range(4, 8)]
    store.commit(0, _arrays(0, 4), rank=0, fingerprint=RUN)
    store.commit(1, _arrays(4, 8), rank=0, fingerprint="1" * 64)  # another run's chunk 1
    scan = store.scan(chunks, RUN)
    assert scan.committed == {0} and "another run" in scan.problems[0][1]
    store.commit(1, _arrays(0, 4), rank=0, fingerprint=RUN)  # rows 0..4 filed as chunk 1, journal hash fits
    scan = store.scan(chunks, RUN)
    assert scan.committed == {0} and "does not hold its rows [4, 8)" in scan.problems[0][1]
    with pytest.raises(ValueError, match="another run"):
        store.load(0, chunks[0], "2" * 64)


@pytest.mark.parametrize("text", ["[]", "{}", '{"fingerprint": 3}', "not json"])
def test_a_manifest_that_is_not_one_is_refused_in_one_line(tmp_path, text):
    store = ChunkStore(tmp_path / "chunks")
    store.root.mkdir()
    (store.root / "manifest.json").write_text(text)
    with pytest.raises(ResumeMismatchError, match="manifest|not valid JSON"):
        store.check_compatible({"max_iter": 4})
