"""The certified radius of each row: the largest eps for which bound propagation proves the label on the eps-ball.

One evaluation at radius eps bounds every margin `f_l - f_j` (j != l) below by `a_j z + b_j` on the ball
(`bounds.Propagation`, then optionally optimised ReLU slopes). Those linear bounds certify, in closed form, the
radius `r = min(eps, min_j b_j / ||a_j||)` (0 unless every b_j > 0): they hold on the eps-ball, hence on any
smaller ball, where `b_j - r ||a_j|| >= 0`. So every evaluation certifies something. The search keeps a bracket
per row: low = the largest r so far (certified), high = the smallest eps that failed, starting at the row's upper
bound (an attack's margin: no radius above it can be proved; infinite without one). The first radius is
`first_fraction` (1/32) of the upper bound; the next is the root of a model of the smallest margin bound,
`m(eps) = m0 - c eps^p`, fitted through the clean margin m0 (the bound at eps = 0) and two evaluations (the
bracket's ends once both exist, else the last two; p = 3 with one), moved a quarter of rtol below the root where a
proof there would end the search (or above, where a failure would) and kept inside the bracket. Where the failed end
"blew up" (its bound below -32 m0: deep networks, whose relaxation errors compound over the layers, e.g. -1e6 or
less at 1/32 of DeepFool's margin on ResNet-18-MNIST) the power law through it aims far too low; the next radius is then
the root of a pole model `m(eps) = m0 - eps / (a - b eps)` through the two largest radii proved, an eighth of the
failed radius while none is proved, or the bracket's geometric mean while one is. A row stops when high <= low
(1 + rtol), when high falls below 2^-20 of the first radius (nothing provable: float32 bounds of ResNet-18-MNIST fail
at every radius), or after `steps` evaluations; its certified radius is the largest r seen (never above any eps
evaluated, so never above the upper bound). On the standard MNIST LeNet this takes 4.35 evaluations per row
(docs/CERTIFY.md), on ResNet-18-MNIST 8.5 (11 with the power law alone, which took about 11% more time).

alpha-CROWN (`method="alpha-crown"`): at each evaluation the lower ReLU slopes of the final bound are optimised
per row and specification by projected Adam steps on `sum_j lower_j(eps)`, with the intermediate bounds kept; the
best bound per specification over the steps is kept (every step's bound is valid: any slope in [0, 1] is).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from attacks.certify.bounds import Plan, Prefix, Propagation, ReluRelaxation, SpecBounds, rounding_tau
from attacks.certify.branching import branch_and_bound
from attacks.certify.graph import Network

SMALLEST_FRACTION = 2.0**-20  # a row whose bracket falls below this fraction of its first radius stops there
BLOWN_UP = 32.0  # a failure whose margin bound is below -BLOWN_UP times the clean margin "blew up" (`_Search`)


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
    first_fraction: float = 1.0 / 32.0
    alpha_steps: int = 20
    alpha_lr: float = 0.5
    bab_domains: int = 16
    spec_chunk: int = 512


@dataclass
class SearchStats:
    """Seconds (wall) per part of the last call (`upper`: the upper-bound attack; `intermediate` bounds, `final`
    bounds and closed form, `alpha` slope optimisation, `bab` branch and bound) and the number of row evaluations."""

    seconds: dict[str, float] = field(
        default_factory=lambda: {"upper": 0.0, "intermediate": 0.0, "final": 0.0, "alpha": 0.0, "bab": 0.0}
    )
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
    clean_margin: torch.Tensor,
    settings: SearchSettings,
    stats: SearchStats,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Certified radii [R] and evaluations used [R] for rows with clean labels `labels` [R], upper bounds `upper`
    [R] (inf: none) and clean margins `clean_margin` [R] (`min_j f_l - f_j` at x0, the bound at eps = 0), by the
    search of the module docstring."""
    rows = labels.shape[0]
    dtype, device = upper.dtype, upper.device
    certified = torch.zeros(rows, dtype=dtype, device=device)
    evaluations = torch.zeros(rows, dtype=torch.long, device=device)
    search = _Search.start(upper, clean_margin)
    eps = torch.where(torch.isfinite(upper), upper * settings.first_fraction, 1.0)
    smallest = eps * SMALLEST_FRACTION
    active = upper > 0
    for _ in range(settings.steps):
        index = active.nonzero().squeeze(1)
        if index.numel() == 0:
            break
        tried = eps[index]
        radius, _, bound = evaluate(net, plan, prefix.select(index), tried, labels[index], settings, stats)
        certified[index] = torch.maximum(certified[index], radius)
        evaluations[index] += 1
        search.update(index, tried, bound, radius >= tried)
        eps[index] = search.next_radius(index, certified[index], settings.rtol)
        high = search.high[index]
        active[index] = (high > certified[index] * (1.0 + settings.rtol)) & (high > smallest[index])
    return certified, evaluations


@dataclass
class _Search:
    """Per row: the bracket (`low` the largest radius proved, 0 at first; `high` the smallest radius that failed, at
    first the upper bound, which no certificate can reach) with the margin's lower bound at each end
    (`low_bound`: the clean margin at radius 0; `high_bound`: nan until a radius fails), and the evaluation before
    the last (`before`: radius and bound, nan at first)."""

    low: torch.Tensor
    low_bound: torch.Tensor
    high: torch.Tensor
    high_bound: torch.Tensor
    m0: torch.Tensor
    last: torch.Tensor
    before: torch.Tensor
    below: torch.Tensor  # how many model roots in a row fell at or below the proved end
    proved_before: torch.Tensor  # the proved end before the current one: radius and bound [2, R], nan at first

    @staticmethod
    def start(upper: torch.Tensor, clean_margin: torch.Tensor) -> _Search:
        nan = torch.full((2, upper.shape[0]), torch.nan, dtype=upper.dtype, device=upper.device)
        below = torch.zeros_like(upper, dtype=torch.long)
        return _Search(torch.zeros_like(upper), clean_margin.clone(), upper.clone(),
                       torch.full_like(upper, torch.nan), clean_margin.clone(), nan, nan.clone(), below,
                       nan.clone())  # fmt: skip

    def update(self, index: torch.Tensor, eps: torch.Tensor, bound: torch.Tensor, proved: torch.Tensor) -> None:
        """After evaluating `eps` [A] at rows `index`: `bound` the smallest lower bound of a margin on the ball."""
        raise_low = proved & (eps > self.low[index])
        lower_high = ~proved & (eps < self.high[index])
        had_low = raise_low & (self.low[index] > 0)
        for side, end in ((0, self.low), (1, self.low_bound)):
            self.proved_before[side, index] = torch.where(had_low, end[index], self.proved_before[side, index])
        self.low[index] = torch.where(raise_low, eps, self.low[index])
        self.low_bound[index] = torch.where(raise_low, bound, self.low_bound[index])
        self.high[index] = torch.where(lower_high, eps, self.high[index])
        self.high_bound[index] = torch.where(lower_high, bound, self.high_bound[index])
        self.before[:, index] = self.last[:, index]
        self.last[0, index], self.last[1, index] = eps, bound

    def next_radius(self, index: torch.Tensor, certified: torch.Tensor, rtol: float) -> torch.Tensor:
        """The root of a model of the margin's lower bound, `m(eps) = m0 - c eps^p`, through the clean margin and two
        evaluations: the bracket's ends once a radius has failed and one has been proved, else the last two (p = 3
        with one), kept strictly inside the bracket by rtol / 2 (else the bracket's geometric mean; without a finite
        bracket, twice the largest radius tried). Past a failure that blew up, a pole model through the two largest
        radii proved instead (module docstring)."""
        low, high = torch.maximum(self.low[index], certified), self.high[index]
        m0 = self.m0[index]
        bracketed = (self.low[index] > 0) & torch.isfinite(self.high_bound[index])
        e1 = torch.where(bracketed, self.low[index], self.before[0, index])
        m1 = torch.where(bracketed, self.low_bound[index], self.before[1, index])
        e2 = torch.where(bracketed, self.high[index], self.last[0, index])
        m2 = torch.where(bracketed, self.high_bound[index], self.last[1, index])
        root = _power_law_root(m0, e1, m1, e2, m2)
        finite = torch.isfinite(high)
        middle = torch.where(low > 0, torch.sqrt(low * torch.where(finite, high, 1.0)), high / 8.0)
        # past a failure whose bound blew up, the power law through it aims far too low: the two largest proved
        # radii and a pole model instead (or the bracket's geometric mean, or an eighth of the failure)
        blown = self.high_bound[index] < -BLOWN_UP * m0
        pole = _pole_root(m0, self.proved_before[0, index], self.proved_before[1, index], self.low[index],
                          self.low_bound[index])  # fmt: skip
        root = torch.where(blown, torch.where(torch.isfinite(pole), pole, middle), root)
        # aim a quarter of rtol below the root where a proof there ends the search, or above where a failure would
        below, above = root * (1.0 - rtol / 4.0), root * (1.0 + rtol / 4.0)
        root = torch.where(high <= below * (1.0 + rtol), below, torch.where(above <= low * (1.0 + rtol), above, root))
        floor, ceiling = low * (1.0 + rtol / 2.0), high / (1.0 + rtol / 2.0)
        fallback = torch.where(finite, middle, torch.maximum(low, self.last[0, index]) * 2.0)
        # a root at or below the proved end again and again: the model misses (e.g. branch and bound proved more than
        # the bound it reports suggests); the step above the proved end grows fourfold each time instead
        below = torch.isfinite(root) & (root <= floor)
        self.below[index] = torch.where(below, self.below[index] + 1, 0)
        step = low * (1.0 + rtol / 2.0 * 4.0 ** (self.below[index] - 1).clamp(min=0))
        floor = torch.where(below, torch.minimum(step, torch.where(finite, middle, step)), floor)
        clamped = torch.minimum(torch.maximum(root, floor), ceiling)
        return torch.where(torch.isfinite(root), clamped, fallback)


def _pole_root(
    m0: torch.Tensor, e1: torch.Tensor, m1: torch.Tensor, e2: torch.Tensor, m2: torch.Tensor
) -> torch.Tensor:
    """The root of `m0 - eps / (a - b eps)` (a drop linear at small radii with a pole at a / b: the bounds of deep
    networks, whose relaxation errors compound over the layers) through (e1, m1) and (e2, m2), i.e. `1 / (m0 - m)`
    linear in `1 / eps`; nan where the points do not fit it."""
    a = (1.0 / (m0 - m1) - 1.0 / (m0 - m2)) / (1.0 / e1 - 1.0 / e2)
    b = a / e2 - 1.0 / (m0 - m2)
    root = a / (b + 1.0 / m0)
    return torch.where((a > 0) & (b + 1.0 / m0 > 0) & (m1 < m0) & (m2 < m0) & (e1 > 0) & (e1 < e2), root, torch.nan)


def _power_law_root(
    m0: torch.Tensor, e1: torch.Tensor, m1: torch.Tensor, e2: torch.Tensor, m2: torch.Tensor
) -> torch.Tensor:
    """The root of `m0 - c eps^p` through (e1, m1) and (e2, m2) (p = 3 through (e2, m2) alone where e1 is nan or
    the pair gives no positive p: CROWN's bounds on the MNIST LeNets fall like eps^2 far from the root and like
    eps^3 to eps^4 near it); nan where the model does not apply (m2 >= m0)."""
    drop1, drop2 = m0 - m1, m0 - m2
    power = torch.log(drop1 / drop2) / torch.log(e1 / e2)
    power = torch.where(torch.isfinite(power) & (power > 0), power, 3.0)
    scale = drop2 / e2**power
    root = (m0 / scale) ** (1.0 / power)
    return torch.where((drop2 > 0) & (m0 > 0), root, torch.nan)


def evaluate(
    net: Network,
    plan: Plan,
    prefix: Prefix,
    eps: torch.Tensor,
    labels: torch.Tensor,
    settings: SearchSettings,
    stats: SearchStats,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bounds at radii `eps` [R]: the certified radius (closed form, <= eps), `phi` (the closed form uncapped) and
    the smallest lower bound of a margin on the eps-ball."""
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
    if settings.method == "bab":
        radius, phi, worst = bounds.radius(eps, tau), bounds.radius(torch.full_like(eps, torch.inf), tau), None
        failed = (radius < eps).nonzero().squeeze(1)
        worst = bounds.lower(eps, tau).amin(dim=1)
        if failed.numel():
            view = propagation.rows_view(failed)
            view.owner = None
            view.linear = {i: b.select(failed) for i, b in view.linear.items()}
            branched = branch_and_bound(view, lam[failed], settings.bab_domains)
            radius[failed], phi[failed], worst[failed] = (
                torch.maximum(a, b) for a, b in zip(branched, (radius[failed], phi[failed], worst[failed]))
            )
        stats.add("bab", start)
        return radius, phi, worst
    infinite = torch.full_like(eps, torch.inf)
    return bounds.radius(eps, tau), bounds.radius(infinite, tau), bounds.lower(eps, tau).amin(dim=1)


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
