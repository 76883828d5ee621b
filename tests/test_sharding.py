"""Row sharding over processes, and the engine's row API: any split of the rows gives the grid's values.

Independent references: a brute-force enumeration of the shards, and the engine's own full-grid call
(itself checked against the per-sample loop in test_deepfool.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks.deepfool import SubspaceDeepFool
from frequency import DCTBlockSubspaces
from margins.run.work import chunk_ranges, row_grid, shard_range


@pytest.mark.parametrize("total,world", [(0, 2), (1, 2), (3, 2), (21, 2), (100, 3), (7, 8)])
def test_shards_cover_every_row_once_and_are_balanced(total, world):
    shards = [list(shard_range(total, rank, world)) for rank in range(world)]
    assert sorted(sum(shards, [])) == list(range(total))  # each row exactly once, no padding
    lengths = [len(s) for s in shards]
    assert max(lengths) - min(lengths) <= 1
    for shard in shards:
        assert shard == list(range(shard[0], shard[0] + len(shard))) if shard else True  # contiguous


def test_shard_range_rejects_a_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 2"):
        shard_range(10, 2, 2)


def test_row_grid_is_sample_major():
    samples, subspaces = row_grid(3, 4, range(5, 9))
    assert samples == [1, 1, 1, 2] and subspaces == [1, 2, 3, 0]


def test_chunk_ranges_cut_consecutive_rows():
    assert chunk_ranges(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]
    assert chunk_ranges(0, 3) == []
    with pytest.raises(ValueError, match="chunk_rows"):
        chunk_ranges(5, 0)


def _attack_chunks(attack, model, x, family, chunks):
    """Each chunk attacked on its own, with only its own samples (as a rank does)."""
    out = {}
    for rows in chunks:
        samples, subs = row_grid(x.shape[0], len(family), rows)
        used = sorted(set(samples))
        local = torch.tensor([used.index(n) for n in samples])
        result = attack.attack_rows(model, x[used], family, local, torch.tensor(subs))
        for i, row in enumerate(rows):
            out[row] = (result.margins[i].item(), int(result.iterations[i]), bool(result.converged[i]))
    return out


def test_chunks_give_the_same_bits_however_they_are_shared_out_and_rows_equal_the_grid():
    torch.manual_seed(0)
    shape = (1, 8, 8)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 4)).double().eval()
    x = torch.rand(5, *shape, dtype=torch.float64)
    family = DCTBlockSubspaces(shape, 4, 2)
    attack = SubspaceDeepFool(batch_size=4)
    chunks = chunk_ranges(5 * len(family), 6)
    single = _attack_chunks(attack, model, x, family, chunks)
    for world in (2, 3, 7):
        shared = {}
        for rank in range(world):
            mine = [chunks[c] for c in shard_range(len(chunks), rank, world)]
            shared.update(_attack_chunks(attack, model, x, family, mine))
        assert shared == single  # bit-equal floats, equal iterations and flags
    grid = attack(model, x, family)  # other batch compositions: equal up to float64 rounding only
    for row, (margin, iterations, converged) in single.items():
        n, s = divmod(row, len(family))
        assert margin == pytest.approx(grid.margins[s, n].item(), rel=1e-12)
        assert iterations == grid.iterations[s, n] and converged == grid.converged[s, n]
