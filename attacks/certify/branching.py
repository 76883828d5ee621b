"""Branch and bound over unstable ReLUs on the final bound (plain ReLU splitting; `method="bab"`).

A domain is the part of the ball where chosen unstable ReLUs have a fixed sign. On a domain where ReLU i is split
active (its input >= 0) its upper line becomes the identity; split inactive (input <= 0), zero. Both lie below the
unsplit upper line on [l, u], and the lower line is kept, so a domain's bound is never below its parent's. The
constraint of a split is not imposed on z (no Lagrange multipliers, as beta-CROWN would add): a domain's bound
is a valid lower bound on that domain because its relaxations hold there, and the union of a split's two domains is
the parent's, so the smallest bound over the leaves bounds the margin on the whole ball. Intermediate bounds are
kept from the unsplit propagation (valid on every domain).

Each round splits every leaf whose bound is not yet positive on the unstable ReLU with the largest product of its
upper line's intercept and the weight the leaf's worst margin puts on it (the gap that split closes), while the
row has fewer than `max_domains` leaves. The certified radius is the smallest closed-form radius over the leaves.
"""

from __future__ import annotations

import torch

from attacks.certify.bounds import Propagation, ReluRelaxation, SpecBounds


def branch_and_bound(
    propagation: Propagation, lam: torch.Tensor, max_domains: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For the rows of `propagation` with margin specifications `lam` [R, n, classes]: the certified radius (closed
    form, <= eps), phi (the closed form uncapped) and the smallest lower bound of a margin, each [R] and each the
    smallest over the leaves of the search (module docstring)."""
    rows = propagation.rows
    relus = [i for i, r in propagation.relax.items() if isinstance(r, ReluRelaxation)]
    owner = torch.arange(rows, device=lam.device)
    splits = {i: torch.zeros(rows, propagation.net.ops[i].size, dtype=torch.int8, device=lam.device) for i in relus}
    bounds, scores = _evaluate(propagation, lam, owner, splits, relus)
    eps, tau = propagation.eps, propagation.tau
    while True:
        worst = bounds.lower(eps[owner], tau).amin(dim=1)
        leaves = torch.bincount(owner, minlength=rows)
        open_ = (worst <= 0) & (leaves[owner] < max_domains) & (scores.amax(dim=1) > 0)
        if not bool(open_.any()):
            break
        # rows with several open leaves split as many as their room allows, worst leaves first
        order = torch.argsort(worst)
        taken = torch.zeros_like(leaves)
        chosen = torch.zeros_like(open_)
        for d in order[open_[order]].tolist():
            row = int(owner[d])
            if leaves[row] + taken[row] < max_domains:
                chosen[d], taken[row] = True, taken[row] + 1
        parents = chosen.nonzero().squeeze(1)
        neuron = scores[parents].argmax(dim=1)  # a flat index over the concatenated ReLUs
        child_owner = owner[parents].repeat(2)
        child_splits = {i: s[parents].repeat(2, 1) for i, s in splits.items()}
        _set_split(child_splits, relus, propagation, neuron, parents.numel())
        child_bounds, child_scores = _evaluate(propagation, lam, child_owner, child_splits, relus)
        keep = ~chosen
        owner = torch.cat([owner[keep], child_owner])
        splits = {i: torch.cat([splits[i][keep], child_splits[i]]) for i in relus}
        bounds = SpecBounds(
            torch.cat([bounds.coef[keep], child_bounds.coef]),
            torch.cat([bounds.const[keep], child_bounds.const]),
            torch.cat([bounds.magnitude[keep], child_bounds.magnitude]),
        )
        scores = torch.cat([scores[keep], child_scores])
    infinite = torch.full_like(eps[owner], torch.inf)
    radius = _row_min(bounds.radius(eps[owner], tau), owner, rows)
    phi = _row_min(bounds.radius(infinite, tau), owner, rows)
    worst = _row_min(bounds.lower(eps[owner], tau).amin(dim=1), owner, rows)
    return radius, phi, worst


def _evaluate(
    propagation: Propagation,
    lam: torch.Tensor,
    owner: torch.Tensor,
    splits: dict[int, torch.Tensor],
    relus: list[int],
) -> tuple[SpecBounds, torch.Tensor]:
    """The final bounds of domains (rows `owner` [D] of the propagation, with `splits`) and each domain's split
    scores [D, total unstable-or-not ReLU neurons] (0 where splitting gains nothing)."""
    view = propagation.rows_view(owner)
    for i in relus:
        relax = view.relax[i]
        split = splits[i].view_as(relax.upper_slope)
        relax.upper_slope = torch.where(split > 0, 1.0, torch.where(split < 0, 0.0, relax.upper_slope))
        relax.upper_shift = torch.where(split != 0, 0.0, relax.upper_shift)
    record: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        bounds = view.backward(propagation.net.output, lam[owner], cut=propagation.plan.exact, record=record)
    worst = bounds.lower(view.eps, view.tau).argmin(dim=1)  # the margin each domain fails on first
    parts = []
    for i in relus:
        negative = record[i].flatten(2)  # [D, n, size]
        weight = negative.gather(1, worst.view(-1, 1, 1).expand(-1, 1, negative.shape[2])).squeeze(1)
        parts.append(-weight * view.relax[i].upper_shift.flatten(1))
    return bounds, torch.cat(parts, dim=1)


def _set_split(
    splits: dict[int, torch.Tensor], relus: list[int], propagation: Propagation, neuron: torch.Tensor, count: int
) -> None:
    """Children of `count` parents (rows 0..count-1: active, count..2count-1: inactive) split on `neuron` (flat
    over the concatenated ReLUs)."""
    offset = 0
    sign = torch.cat([torch.ones(count), -torch.ones(count)]).to(torch.int8).to(neuron.device)
    both = neuron.repeat(2)
    for i in relus:
        size = propagation.net.ops[i].size
        inside = (both >= offset) & (both < offset + size)
        rows = inside.nonzero().squeeze(1)
        splits[i][rows, both[rows] - offset] = sign[rows]
        offset += size


def _row_min(values: torch.Tensor, owner: torch.Tensor, rows: int) -> torch.Tensor:
    out = torch.full((rows,), torch.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, owner, values, reduce="amin")
