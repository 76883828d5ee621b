"""The certified radius of each row: the largest eps for which bound propagation proves the label on the eps-ball.

One evaluation at radius eps bounds every margin `f_l - f_j` (j != l) below by `a_j z + b_j` on the ball
(`bounds.Propagation`, then optionally optimised ReLU slopes). Those linear bounds certify, in closed form, the
radius `r = min(eps, min_j b_j / ||a_j||)` (0 unless every b_j > 0): they hold on the eps-ball, hence on any
smaller ball, where `b_j - r ||a_j|| >= 0`. So every evaluation certifies something, and `phi = min_j b_j /
||a_j||` (not capped) tells where to look next: the radius whose intermediate bounds would prove itself lies
between eps and phi when bounds tighten as eps shrinks. The search keeps a bracket per row: low = the largest r
so far (certified), high = the smallest eps that failed, starting at the row's upper bound (an attack's margin: no
radius above it can be proved; infinite without one). After a proved eps the next radius is phi (at most the
bracket's geometric mean); after a failed one, the geometric mean (or eps / 8 while nothing is certified). A row
stops when high <= low (1 + rtol) or after `steps` evaluations; its certified radius is the largest r seen (never
above any eps evaluated, so never above the upper bound).

alpha-CROWN (`method="alpha-crown"`): at each evaluation the lower ReLU slopes of the final bound are optimised
per row and specification by projected Adam steps on `sum_j lower_j(eps)`, with the intermediate bounds kept; the
best bound per specification over the steps is kept (every step's bound is valid: any slope in [0, 1] is).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from attacks.certify.bounds import Plan, Prefix, Propagation, ReluRelaxation, SpecBounds, rounding_tau
from attacks.certify.graph import Network


@dataclass
class SearchSettings:
    """method: "crown" or "alpha-crown"; intermediate: "backward" or "forward" (`bounds`); steps: evaluations per
    row at most; rtol: relative width of the final bracket; first_fraction: the first radius tried, as a fraction
    of the row's upper bound; alpha_steps, alpha_lr: slope optimisation; spec_chunk: specifications per backward
    pass of intermediate bounds (memory)."""

    method: str = "crown"
    intermediate: str = "backward"
    steps: int = 12
    rtol: float = 0.01
    first_fraction: float = 1.0 / 16.0
    alpha_steps: int = 20
    alpha_lr: float = 0.5
    spec_chunk: int = 512


@dataclass
class SearchStats:
    """Seconds per part of the last search (`intermediate` bounds, `final` bounds and closed form, `alpha` slope
    optimisation) and the number of row evaluations."""

    seconds: dict[str, float] = field(default_factory=lambda: {"intermediate": 0.0, "final": 0.0, "alpha": 0.0})
    evaluations: int = 0

    def add(self, part: str, start: float) -> float:
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - start
        return now


def margin_specs(labels: torch.Tensor, num_classes: int, dtype: torch.dtype) -> torch.Tensor:
    """`e_l - e_j` for every j != l: [R, num_classes - 1, num_classes]."""
    others = torch.arange(num_classes - 1, device=labels.device).unsqueeze(0).expand(labels.shape[0], -1)
    others = others + (others >= labels.unsqueeze(1)).long()
    eye = torch.eye(num_classes, dtype=dtype, device=labels.device)
    return eye[labels].unsqueeze(1) - eye[others]


def certified_radii(
    net: Network,
    plan: Plan,
    prefix: Prefix,
    labels: torch.Tensor,
    upper: torch.Tensor,
    settings: SearchSettings,
    stats: SearchStats,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Certified radii [R] and evaluations used [R] for rows with clean labels `labels` [R] and upper bounds
    `upper` [R] (inf: none), by the search of the module docstring."""
    rows = labels.shape[0]
    dtype, device = upper.dtype, upper.device
    certified = torch.zeros(rows, dtype=dtype, device=device)
    evaluations = torch.zeros(rows, dtype=torch.long, device=device)
    low = torch.zeros_like(certified)
    high = upper.clone()
    eps = torch.where(torch.isfinite(upper), upper * settings.first_fraction, 1.0)
    active = upper > 0
    for _ in range(settings.steps):
        index = active.nonzero().squeeze(1)
        if index.numel() == 0:
            break
        radius, phi = evaluate(net, plan, prefix.select(index), eps[index], labels[index], settings, stats)
        proved = radius >= eps[index]
        certified[index] = torch.maximum(certified[index], radius)
        low[index] = certified[index]
        high[index] = torch.where(proved, high[index], eps[index])
        evaluations[index] += 1
        eps[index] = _next_radius(proved, eps[index], phi, low[index], high[index], settings.rtol)
        active[index] = ~(high[index] <= low[index] * (1.0 + settings.rtol))
    return certified, evaluations


def _next_radius(
    proved: torch.Tensor, eps: torch.Tensor, phi: torch.Tensor, low: torch.Tensor, high: torch.Tensor, rtol: float
) -> torch.Tensor:
    """After a proved radius: phi (where the last bounds would still prove; at least eps (1 + 2 rtol)), no further
    than the bracket's geometric mean; after a failed one: the geometric mean of the bracket, or eps / 8 while
    nothing is certified."""
    finite = torch.isfinite(high)
    middle = torch.sqrt(low * torch.where(finite, high, 1.0))
    optimistic = torch.where(torch.isfinite(phi), torch.maximum(phi, eps * (1.0 + 2.0 * rtol)), eps * 8.0)
    after_proof = torch.where(finite, torch.minimum(optimistic, middle), optimistic)
    after_failure = torch.where(low > 0, middle, eps / 8.0)
    return torch.where(proved, after_proof, after_failure)


def evaluate(
    net: Network,
    plan: Plan,
    prefix: Prefix,
    eps: torch.Tensor,
    labels: torch.Tensor,
    settings: SearchSettings,
    stats: SearchStats,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bounds at radii `eps` [R]: the certified radius (closed form, <= eps) and `phi` (closed form uncapped)."""
    start = time.perf_counter()
    with torch.no_grad():
        propagation = Propagation(net, plan, prefix, eps, settings.intermediate, settings.spec_chunk).run()
    start = stats.add("intermediate", start)
    lam = margin_specs(labels, net.num_classes, eps.dtype)
    with torch.no_grad():
        bounds = propagation.backward(net.output, lam)
    start = stats.add("final", start)
    if settings.method == "alpha-crown":
        bounds = optimised_slopes(propagation, lam, bounds, settings)
        start = stats.add("alpha", start)
    stats.evaluations += int(eps.numel())
    tau = rounding_tau(eps.dtype)
    return bounds.radius(eps, tau), bounds.radius(torch.full_like(eps, torch.inf), tau)


def optimised_slopes(
    propagation: Propagation, lam: torch.Tensor, base: SpecBounds, settings: SearchSettings
) -> SpecBounds:
    """The final bounds with the lower ReLU slopes optimised per row and specification (module docstring): the
    best of `base` and every step, per specification."""
    relus = {i: r for i, r in propagation.relax.items() if isinstance(r, ReluRelaxation) and bool(r.unstable.any())}
    if not relus or settings.alpha_steps < 1:
        return base
    count = lam.shape[1]
    slopes = {
        i: r.lower_slope.unsqueeze(1).expand(-1, count, *r.lower_slope.shape[1:]).clone().requires_grad_(True)
        for i, r in relus.items()
    }
    optimizer = torch.optim.Adam(list(slopes.values()), lr=settings.alpha_lr)
    eps, tau = propagation.eps, propagation.tau
    best = SpecBounds(base.coef.clone(), base.const.clone(), base.magnitude.clone())
    best_lower = best.lower(eps, tau)
    cut = propagation.plan.exact
    for _ in range(settings.alpha_steps):
        bounds = propagation.backward(propagation.net.output, lam, cut=cut, lower_slopes=slopes)
        lower = bounds.lower(eps, tau)
        optimizer.zero_grad()
        (-lower.sum()).backward()
        with torch.no_grad():
            better = lower > best_lower
            best_lower = torch.where(better, lower, best_lower)
            best.coef = torch.where(better.unsqueeze(2), bounds.coef, best.coef)
            best.const = torch.where(better, bounds.const, best.const)
            best.magnitude = torch.where(better, bounds.magnitude, best.magnitude)
        optimizer.step()
        with torch.no_grad():
            for slope in slopes.values():
                slope.clamp_(0.0, 1.0)
    return SpecBounds(best.coef.detach(), best.const.detach(), best.magnitude.detach())
