"""The certifier's radius search (`attacks.certify.search.certified_radii`) on synthetic margin-bound curves: it
never reports a radius that was not proved, ends within its relative tolerance of the root, stops on rows where
nothing can be proved, and needs few evaluations on the two shapes met in practice (a power law, the MNIST LeNets;
a pole, deep networks whose bounds blow up past some radius, ResNet-18-MNIST).

A curve stands in for one bound evaluation: `m(eps)` the smallest margin lower bound on the eps-ball, proved where
`m >= 0`. Search settings are the certifier's defaults.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

import attacks.certify.search as search
from attacks.certify.search import SearchSettings, SearchStats, certified_radii

F64 = torch.float64
Curve = Callable[[torch.Tensor], torch.Tensor]


class _Rows:
    """Stands in for the rows' `Prefix`: `select` yields the row numbers the curve evaluation reads."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def select(self, index: torch.Tensor) -> torch.Tensor:
        return self.rows[index]


def run_search(
    curves: list[Curve], upper: list[float], clean: list[float], monkeypatch
) -> tuple[torch.Tensor, torch.Tensor, list[list[float]]]:
    """Certified radii, evaluations per row and the radii each row tried, with `curves[i]` as row i's bound."""
    tried: list[list[float]] = [[] for _ in curves]

    def evaluate(net, plan, rows, eps, labels, settings, stats):
        bound = torch.stack([curves[int(r)](e) for r, e in zip(rows, eps)])
        for r, e in zip(rows.tolist(), eps.tolist()):
            tried[r].append(e)
        radius = torch.where(bound >= 0, eps, torch.zeros_like(eps))
        return radius, radius, bound

    monkeypatch.setattr(search, "evaluate", evaluate)
    n = len(curves)
    certified, evaluations = certified_radii(
        None, None, _Rows(torch.arange(n)), torch.zeros(n, dtype=torch.long), torch.tensor(upper, dtype=F64),
        torch.tensor(clean, dtype=F64), SearchSettings(), SearchStats(),
    )  # fmt: skip
    return certified, evaluations, tried


def power_law(m0: float, root: float, p: float) -> Curve:
    """`m0 (1 - (eps / root)^p)`: the shape of CROWN's bounds on the MNIST LeNets."""
    return lambda eps: m0 * (1.0 - (eps / root) ** p)


def pole(m0: float, root: float, blow_up: float = -1e6) -> Curve:
    """A drop `c eps^1.2 / (1 - eps / r)^2` with a pole at r = 1.1 root (c makes m vanish at `root`), and `blow_up`
    past the pole: the shape of CROWN's bounds on ResNet-18-MNIST (about -1e6 at 1/32 of DeepFool's margin)."""
    r = 1.1 * root
    c = m0 * (1.0 - root / r) ** 2 / root**1.2

    def m(eps: torch.Tensor) -> torch.Tensor:
        inside = eps < r
        drop = c * eps**1.2 / (1.0 - torch.where(inside, eps, 0.0) / r) ** 2
        return torch.where(inside, torch.clamp(m0 - drop, min=blow_up), torch.full_like(eps, blow_up))

    return m


def assert_bracketed(certified: torch.Tensor, roots: list[float], tried: list[list[float]]) -> None:
    """Every certified radius was tried and proved (<= the root) and lies within rtol (1%) of the root."""
    for value, root, radii in zip(certified.tolist(), roots, tried):
        assert value <= root
        assert value in radii
        assert value >= root / (1.0 + SearchSettings().rtol)


def test_the_search_brackets_the_root_of_power_law_bounds_in_few_evaluations(monkeypatch):
    roots = [0.2, 0.5, 1.1, 3.0]
    curves = [power_law(9.0, r, p) for r, p in zip(roots, (2.0, 3.0, 4.0, 2.5))]
    upper = [25.0 * r for r in roots]  # DeepFool's margins are 10-50x the certified ones on the LeNets
    certified, evaluations, tried = run_search(curves, upper, [9.0] * 4, monkeypatch)
    assert_bracketed(certified, roots, tried)
    assert evaluations.max() <= 6


def test_bounds_that_blow_up_past_a_radius_take_a_pole_model_and_few_evaluations(monkeypatch):
    """The first radius (1/32 of the upper bound) fails with a bound of -1e6; the power law through that failure
    alone aimed at about 1/40 of the root, then climbed slowly (11 evaluations on ResNet-18-MNIST's rows)."""
    roots = [0.042, 0.096, 0.3]
    upper = [2.42, 12.8, 20.0]
    curves = [pole(9.18, r) for r in roots]
    certified, evaluations, tried = run_search(curves, upper, [9.18] * 3, monkeypatch)
    assert_bracketed(certified, roots, tried)
    assert evaluations.max() <= 9


def test_a_row_where_nothing_can_be_proved_stops_at_a_certificate_of_zero(monkeypatch):
    """float32 bounds of ResNet-18-MNIST fail even at radius 1e-9 (the rounding allowance compounds over its
    layers): the search must not spend its evaluations trying radius 0 again and again."""
    always_fails: Curve = lambda eps: torch.full_like(eps, -5e5)  # noqa: E731
    certified, evaluations, tried = run_search([always_fails], [2.4], [9.0], monkeypatch)
    assert certified.item() == 0.0
    assert evaluations.item() < SearchSettings().steps
    assert all(e > 0 for e in tried[0])


@pytest.mark.parametrize("shape", ["power law", "pole"])
def test_a_certified_radius_is_never_above_a_failed_one(monkeypatch, shape):
    """Whatever the shape, a radius that failed bounds every certificate (the bracket's invariant)."""
    curve = power_law(5.0, 0.4, 3.0) if shape == "power law" else pole(5.0, 0.4)
    certified, _, tried = run_search([curve], [10.0], [5.0], monkeypatch)
    failed = [e for e in tried[0] if curve(torch.tensor(e, dtype=F64)) < 0]
    assert failed and certified.item() < min(failed)
