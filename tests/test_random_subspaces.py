"""Random control subspaces, user bases and `build_subspace_family`.

References: dense `BasisSubspaces` projectors built from each subspace's explicit basis; the Hartley matrix written
from its textbook formula cas(2 pi k n / N) / sqrt(N); the Haar expectation dim(block)/D of a random unit vector's
energy inside a fixed subspace; the analytic margin of a linear model.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from attacks.deepfool import SubspaceDeepFool
from common.errors import InputError
from frequency import DCTBlockSubspaces, DCTGridSubspaces, FullSpace
from frequency.families import build_subspace_family
from frequency.random_subspaces import RandomSubspaces, hartley, load_bases
from frequency.subspaces import BasisSubspaces
from margins.inputs import describe_family

SHAPE = (1, 12, 12)


def test_hartley_matches_formula_and_is_involution():
    n = 10
    k = torch.arange(n, dtype=torch.float64)
    angle = 2 * math.pi * k[:, None] * k[None, :] / n
    cas = (torch.cos(angle) + torch.sin(angle)) / math.sqrt(n)
    x = torch.randn(3, n, dtype=torch.float64)
    torch.testing.assert_close(hartley(x), x @ cas.T)
    torch.testing.assert_close(hartley(hartley(x)), x)


@pytest.mark.parametrize("method", ["qr", "hartley"])
def test_projector_orthonormal_and_matches_dense_basis(method):
    family = RandomSubspaces(SHAPE, dim=16, count=3, seed=1, method=method)
    d = math.prod(SHAPE)
    g = torch.randn(6, *SHAPE, dtype=torch.float64)
    index = torch.tensor([0, 1, 2, 2, 1, 0])
    dense = BasisSubspaces([family.basis(s) for s in range(3)], SHAPE)  # raises unless orthonormal
    torch.testing.assert_close(family.project(g, index), dense.project(g, index))
    p = family.basis(1) @ family.basis(1).T
    torch.testing.assert_close(p @ p, p)
    assert torch.linalg.matrix_rank(p).item() == 16 and p.shape == (d, d)
    coords = family.coordinates(g, index)
    torch.testing.assert_close(coords.norm(dim=1), family.project(g, index).flatten(1).norm(dim=1))


@pytest.mark.parametrize("method", ["qr", "hartley"])
def test_seeded_reproducible_and_independent_of_count(method):
    a = RandomSubspaces(SHAPE, 8, 2, seed=5, method=method)
    b = RandomSubspaces(SHAPE, 8, 4, seed=5, method=method)
    c = RandomSubspaces(SHAPE, 8, 2, seed=6, method=method)
    torch.testing.assert_close(a.basis(1), b.basis(1))
    assert (a.basis(0) - c.basis(0)).abs().max() > 0.01
    assert (a.basis(0).T @ a.basis(1)).abs().max() < 0.9  # two different subspaces


@pytest.mark.parametrize("method", ["qr", "hartley"])
def test_energy_spread_over_spectrum_like_haar(method):
    """A random k-dim subspace holds, on average, a fraction 64/784 of a fixed 64-dim subspace (low DCT block)."""
    shape = (1, 28, 28)
    family = RandomSubspaces(shape, 64, 6, seed=0, method=method)
    low = DCTBlockSubspaces(shape, 8, 1)
    fractions = []
    for s in range(len(family)):
        basis = family.basis(s).T.reshape(64, *shape)
        fractions.append(low.project(basis, torch.zeros(64, dtype=torch.long)).pow(2).sum().item() / 64)
    assert abs(np.mean(fractions) - 64 / 784) < 0.02, fractions


def test_hartley_is_implicit_for_imagenet():
    family = RandomSubspaces((3, 224, 224), 768, 14, seed=0)
    assert family.method == "hartley"
    assert family.memory_bytes() < 14 * 2 * 2**20  # vs 14 * 460 MB dense
    g = torch.randn(2, 3, 224, 224)
    projected = family.project(g, torch.tensor([0, 13]))
    torch.testing.assert_close(family.project(projected, torch.tensor([0, 13])), projected, atol=1e-4, rtol=1e-4)


def test_deepfool_on_random_subspaces_is_analytic():
    torch.manual_seed(0)
    family = RandomSubspaces((1, 8, 8), 10, 3, seed=0, method="hartley")
    linear = nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).double()
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    result = SubspaceDeepFool(num_candidates=2)(linear, x, family)
    w = (linear[1].weight[1] - linear[1].weight[0]).detach().view(1, 1, 8, 8)
    gap = (linear(x)[:, 1] - linear(x)[:, 0]).abs().detach()
    for s in range(3):
        expected = 1.02 * gap / family.project(w, torch.tensor([s])).norm()
        torch.testing.assert_close(result.margins[s], expected, rtol=1e-6, atol=1e-9)


def test_load_bases_npy_pt_and_errors(tmp_path):
    q = torch.linalg.qr(torch.randn(144, 5, dtype=torch.float64)).Q
    np.save(tmp_path / "one.npy", q.numpy())
    torch.save([q[:, :2].float(), q[:, 2:]], tmp_path / "two.pt")
    family = load_bases([tmp_path / "one.npy", tmp_path / "two.pt"], SHAPE)
    assert family.dims == [5, 2, 3]
    np.save(tmp_path / "bad.npy", (2 * q).numpy())
    with pytest.raises(InputError, match="not orthonormal"):
        load_bases(tmp_path / "bad.npy", SHAPE)
    np.save(tmp_path / "shape.npy", q[:100].numpy())
    with pytest.raises(InputError, match=r"must be \[D=144, k\]"):
        load_bases(tmp_path / "shape.npy", SHAPE)
    with pytest.raises(InputError, match="does not exist"):
        load_bases(tmp_path / "missing.npy", SHAPE)


def test_build_subspace_family_kinds(tmp_path):
    shape = (1, 28, 28)
    assert isinstance(build_subspace_family("dct", shape, 8, 1), DCTBlockSubspaces)
    assert isinstance(build_subspace_family("full", shape), FullSpace)
    assert len(build_subspace_family("grid", shape, 8, 4)) == 36 and isinstance(
        build_subspace_family("grid", shape, 8, 4), DCTGridSubspaces
    )
    random = build_subspace_family("random", shape, 8, 1, seed=3)
    assert len(random) == 21 and random.dims[0] == 64
    np.save(tmp_path / "b.npy", torch.linalg.qr(torch.randn(784, 4)).Q.numpy())
    assert build_subspace_family("basis", shape, bases=tmp_path / "b.npy").dims == [4]
    with pytest.raises(InputError, match="unknown subspace kind"):
        build_subspace_family("wavelet", shape, 8, 1)


@pytest.mark.parametrize("method", ["qr", "hartley"])
def test_the_bases_and_their_digest_do_not_depend_on_the_thread_count(method):
    """A resume checks the family's digest: the same seed gives the same bits at 1, 2 or 3 CPU threads (LAPACK's
    blocked QR splits its sums by thread; the QR runs on one), and the caller's thread count is left as it was."""
    saved = torch.get_num_threads()
    digests = set()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            family = RandomSubspaces((1, 28, 28), 64, 2, seed=0, method=method)
            digests.add(describe_family(family)["subspace_sha256"])
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(saved)
    assert len(digests) == 1
