"""How (sample, subspace) rows are split over processes: contiguous, balanced, no duplicates, no padding."""

from __future__ import annotations


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
