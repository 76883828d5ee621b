"""Linear bound propagation over an L2 ball of subspace coordinates (CROWN / DeepPoly-style relaxations).

A row is (x0, subspace with orthonormal basis B [d, k], radius eps); the network's input is `x0 + B z` with
`||z||_2 <= eps`. Every operation's value gets bounds valid on the whole ball:

- concrete bounds (`box`): `lower <= h(z) <= upper` elementwise, [R, *shape];
- linear bounds in z (`LinearBounds`): `a_l z + b_l <= h(z) <= a_u z + b_u`, coefficients [R, k, *shape].

The affine prefix (the operations before the first ReLU or max-pool: the normalisation, the first convolution) is
exact: its linear function of z is computed once per subspace (the basis images through the linear parts) and once
per sample (x0 through the prefix). ReLU with pre-activation bounds l < 0 < u is relaxed by the upper line through
(l, 0) and (u, u) and a lower line `alpha * y` (alpha in [0, 1]; CROWN's choice 1 if u >= -l else 0); max-pooling
by a lower bound equal to one input of its window and an upper bound that is a constant or one input plus a
constant (both with nonnegative weights). A linear function `a z + b` is concretised over the ball as
`b -+ eps ||a||_2`.

Intermediate bounds (the pre-activation bounds every relaxation needs):
- "backward" (CROWN): a backward pass from each intermediate operation, with one specification per neuron (and
  its negation), through the relaxations down to the *cut*: the exact prefix and the nonlinear operations that
  follow it with no affine layer in between (their forward linear bounds equal what the backward pass would
  compute there, because those relaxations have nonnegative weights and do not depend on the specification).
  Operations that are one affine chain over the cut get their bounds by forward propagation instead, which gives
  the same numbers at a cost proportional to k rather than to their number of neurons.
- "forward": linear bounds in z propagated forward through every operation (cost proportional to k per layer);
  looser, because the lower and upper functions of a layer are combined before their signs cancel.
Concrete bounds are always intersected with interval arithmetic on the inputs' concrete bounds.

Floating point: every concrete bound is moved outward by `tau * M`, where M sums the absolute values of the terms
that formed it (`|b|`, `eps ||a||`, and a running magnitude of the constants accumulated through the layers) and
`tau = 2**16` unit roundoffs of the dtype (float64: 1.5e-11; float32: 7.8e-3). Relaxation lines are moved up by a
few unit roundoffs of their endpoints so that rounding of their slopes cannot cut into the function.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from attacks.certify.graph import Affine, Input, MaxPool, Network, Op, ReLU

ROUNDING_UNITS = 2.0**16


def rounding_tau(dtype: torch.dtype) -> float:
    """The relative outward move applied to every concrete bound (module docstring)."""
    return ROUNDING_UNITS * torch.finfo(dtype).eps / 2.0


@dataclass
class LinearBounds:
    """`lower_coef z + lower_const <= h(z) <= upper_coef z + upper_const` on the ball: coefficients [R, k, *shape],
    constants [R, *shape]; `magnitude` [R, *shape] bounds the absolute values of the terms summed into the
    constants (for the rounding allowance). `exact`: lower and upper are the same function."""

    lower_coef: torch.Tensor
    lower_const: torch.Tensor
    upper_coef: torch.Tensor
    upper_const: torch.Tensor
    magnitude: torch.Tensor
    exact: bool = False

    @staticmethod
    def exact_function(coef: torch.Tensor, const: torch.Tensor, magnitude: torch.Tensor) -> LinearBounds:
        return LinearBounds(coef, const, coef, const, magnitude, exact=True)

    def select(self, rows: torch.Tensor) -> LinearBounds:
        if self.exact:
            return LinearBounds.exact_function(self.lower_coef[rows], self.lower_const[rows], self.magnitude[rows])
        return LinearBounds(
            self.lower_coef[rows],
            self.lower_const[rows],
            self.upper_coef[rows],
            self.upper_const[rows],
            self.magnitude[rows],
        )

    def concretize(self, eps: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Concrete bounds [R, *shape] on the balls of radii `eps` [R], moved outward by the rounding allowance."""
        view = (-1,) + (1,) * (self.lower_const.dim() - 1)
        radius = eps.view(view)
        lower_spread = radius * self.lower_coef.norm(dim=1)
        lower = self.lower_const - lower_spread
        lower = lower - tau * (self.magnitude + self.lower_const.abs() + lower_spread)
        if self.exact:
            upper = self.lower_const + lower_spread
            return lower, upper + tau * (self.magnitude + self.lower_const.abs() + lower_spread)
        upper_spread = radius * self.upper_coef.norm(dim=1)
        upper = self.upper_const + upper_spread
        return lower, upper + tau * (self.magnitude + self.upper_const.abs() + upper_spread)


@dataclass
class ReluRelaxation:
    """Per neuron [R, *shape]: `lower_slope * y <= relu(y) <= upper_slope * y + upper_shift` for y in [l, u];
    `unstable` marks l < 0 < u (only there is `lower_slope` free in [0, 1])."""

    lower_slope: torch.Tensor
    upper_slope: torch.Tensor
    upper_shift: torch.Tensor
    unstable: torch.Tensor

    @staticmethod
    def of(lower: torch.Tensor, upper: torch.Tensor) -> ReluRelaxation:
        active, inactive = lower >= 0, upper <= 0
        unstable = ~active & ~inactive
        width = torch.where(unstable, upper - lower, 1.0)
        slope = torch.where(unstable, upper / width, active.to(lower.dtype))
        roundoff = 4.0 * torch.finfo(lower.dtype).eps * upper.abs()
        shift = torch.where(unstable, -slope * lower + roundoff, 0.0)
        lower_slope = torch.where(unstable, (upper >= -lower).to(lower.dtype), active.to(lower.dtype))
        return ReluRelaxation(lower_slope, slope, shift, unstable)


@dataclass
class PoolRelaxation:
    """Per output [R, C, oh, ow] of a max-pool: `h[lower_index] <= max <= h[upper_index] * upper_use + upper_shift`
    (indices into the window's m positions, `windows` order)."""

    lower_index: torch.Tensor
    upper_index: torch.Tensor
    upper_use: torch.Tensor
    upper_shift: torch.Tensor

    @staticmethod
    def of(op: MaxPool, lower: torch.Tensor, upper: torch.Tensor) -> PoolRelaxation:
        """Lower: the input with the largest lower bound (ties: the largest upper bound). Upper: the input j with
        the largest upper bound plus `max(0, u_2 - l_j)` (u_2 the second largest upper bound; exact when l_j >= u_2),
        or the constant u_j, whichever is smaller at the centre of the box."""
        low = windows(lower, op, -torch.inf)  # [R, m, C, oh, ow]
        high = windows(upper, op, -torch.inf)
        best_low = low.amax(dim=1, keepdim=True)
        lower_index = torch.where(low == best_low, high, -torch.inf).argmax(dim=1)
        if high.shape[1] >= 2:
            top = high.topk(2, dim=1)
            first, second, upper_index = top.values[:, 0], top.values[:, 1], top.indices[:, 0]
        else:
            first, second, upper_index = (
                high[:, 0],
                torch.full_like(high[:, 0], -torch.inf),
                high.new_zeros(high[:, 0].shape, dtype=torch.long),
            )
        low_j = low.gather(1, upper_index.unsqueeze(1)).squeeze(1)
        roundoff = 4.0 * torch.finfo(lower.dtype).eps * (second.abs().nan_to_num(posinf=0.0) + low_j.abs())
        offset = torch.where(torch.isfinite(second), (second - low_j).clamp(min=0.0) + roundoff, 0.0)
        use = (low_j + first) / 2.0 + offset <= first
        shift = torch.where(use, offset, first)
        return PoolRelaxation(lower_index, upper_index, use, shift)


def windows(h: torch.Tensor, op: MaxPool, fill: float) -> torch.Tensor:
    """The pooling windows of `h: [..., C, H, W]` as `[..., m, C, oh, ow]` (m = kernel area; padding = `fill`)."""
    (kh, kw), (sh, sw), (ph, pw) = op.kernel, op.stride, op.padding
    _, oh, ow = op.shape
    if ph or pw:
        h = torch.nn.functional.pad(h, (pw, pw, ph, ph), value=fill)
    parts = [
        h[..., i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw] for i in range(kh) for j in range(kw)
    ]
    return torch.stack(parts, dim=h.dim() - 3)


def unwindows(w: torch.Tensor, op: MaxPool) -> torch.Tensor:
    """The transpose of `windows`: `[..., m, C, oh, ow] -> [..., C, H, W]`, overlapping windows summed."""
    (kh, kw), (sh, sw), (ph, pw) = op.kernel, op.stride, op.padding
    channels, height, width = op.in_shape
    _, oh, ow = op.shape
    lead = w.shape[: w.dim() - 4]
    out = w.new_zeros(*lead, channels, height + 2 * ph, width + 2 * pw)
    for position in range(kh * kw):
        i, j = divmod(position, kw)
        out[..., i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw] += w[..., position, :, :, :]
    return out[..., ph : ph + height, pw : pw + width]


@dataclass
class Plan:
    """What bound propagation computes for a network, fixed by its structure.

    exact: operations that are affine functions of the input (the prefix); frontier: exact operations read by
    other operations (or the output) — their linear functions of z are computed once per batch; cut: exact
    operations and nonlinear operations over the cut (the backward passes stop there); direct: affine operations
    with one input in the cut or in direct (bounded by forward propagation, equal to the backward pass); pre: the
    inputs of ReLUs and max-pools (their concrete bounds drive the relaxations)."""

    exact: set[int]
    frontier: list[int]
    cut: set[int]
    direct: set[int]
    pre: set[int]

    @staticmethod
    def of(net: Network) -> Plan:
        exact: set[int] = set()
        cut: set[int] = set()
        direct: set[int] = set()
        pre: set[int] = set()
        readers: dict[int, list[int]] = {}
        for index, op in enumerate(net.ops):
            for source in op.inputs:
                readers.setdefault(source, []).append(index)
            if isinstance(op, Input) or (isinstance(op, Affine) and all(i in exact for i in op.inputs)):
                exact.add(index)
                cut.add(index)
            elif isinstance(op, (ReLU, MaxPool)):
                pre.add(op.inputs[0])
                if op.inputs[0] in cut:
                    cut.add(index)
            elif isinstance(op, Affine) and len(op.inputs) == 1 and (op.inputs[0] in cut or op.inputs[0] in direct):
                direct.add(index)
        frontier = [i for i in sorted(exact) if any(r not in exact for r in readers.get(i, [])) or i == net.output]
        return Plan(exact, frontier, cut, direct, pre)


@dataclass
class Prefix:
    """The exact prefix's linear functions of z at the frontier operations, per row: `coef[i]` [R, k, *shape],
    `const[i]` [R, *shape] (= the operation's value at x0), `magnitude[i]` [R, *shape]."""

    coef: dict[int, torch.Tensor]
    const: dict[int, torch.Tensor]
    magnitude: dict[int, torch.Tensor]

    def with_rows(self, per_subspace: dict[int, torch.Tensor], position: torch.Tensor) -> Prefix:
        """This prefix with its coefficients gathered from `per_subspace` ({index: [U, k, *shape]}) at each row's
        subspace position `position` [R]."""
        return Prefix({i: t[position] for i, t in per_subspace.items()}, self.const, self.magnitude)

    def select(self, rows: torch.Tensor) -> Prefix:
        return Prefix(
            {i: t[rows] for i, t in self.coef.items()},
            {i: t[rows] for i, t in self.const.items()},
            {i: t[rows] for i, t in self.magnitude.items()},
        )


def prefix_functions(
    net: Network, plan: Plan, basis_images: torch.Tensor, x0: torch.Tensor
) -> tuple[dict[int, torch.Tensor], Prefix]:
    """The exact prefix at the frontier: the coefficients per subspace ({index: [U, k, *shape]}, from the basis
    images `basis_images: [U, k, *image_shape]` = B e_1..B e_k of U subspaces) and the rows' constants and
    magnitudes (from the clean images `x0: [R, *image_shape]`; `Prefix.coef` left empty: `Prefix.with_rows`
    gathers it)."""
    coefs: dict[int, torch.Tensor] = {}
    consts: dict[int, torch.Tensor] = {}
    mags: dict[int, torch.Tensor] = {}
    for index, op in enumerate(net.ops):
        if index not in plan.exact:
            continue
        if isinstance(op, Input):
            coefs[index], consts[index], mags[index] = basis_images, x0, x0.abs()
            continue
        assert isinstance(op, Affine)
        coefs[index] = op.linear([coefs[i] for i in op.inputs])
        consts[index] = op.forward([consts[i] for i in op.inputs])
        bias = op.forward([torch.zeros_like(mags[i]) for i in op.inputs]).abs()
        mags[index] = op.absolute([mags[i] for i in op.inputs]) + bias
    frontier = plan.frontier
    prefix = Prefix({}, {i: consts[i] for i in frontier}, {i: mags[i] for i in frontier})
    return {i: coefs[i] for i in frontier}, prefix


@dataclass
class Timing:
    """Seconds spent per part of the bound computation (accumulated over calls)."""

    intermediate: float = 0.0
    final: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)


class Propagation:
    """Bounds of `net` for a batch of rows on the balls of radii `eps` [R] (module docstring).

    After `run()`: `box[i]` concrete bounds of every operation, `relax[i]` the relaxation of every ReLU and max-pool,
    `linear[i]` the linear bounds of the operations that have them. `final_bounds(lam)` bounds `lam . logits`.
    `splits` (optional, {ReLU index: int8 [R, *shape]}): +1 forces a ReLU's input >= 0 (identity), -1 forces it
    <= 0 (zero); the bounds are then valid on the part of the ball where the splits hold (branch and bound).
    """

    def __init__(
        self,
        net: Network,
        plan: Plan,
        prefix: Prefix,
        eps: torch.Tensor,
        intermediate: str = "backward",
        spec_chunk: int = 512,
        splits: dict[int, torch.Tensor] | None = None,
    ):
        self.net, self.plan, self.prefix, self.eps = net, plan, prefix, eps
        self.intermediate, self.spec_chunk = intermediate, spec_chunk
        self.splits = splits or {}
        self.tau = rounding_tau(eps.dtype)
        self.box: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.relax: dict[int, ReluRelaxation | PoolRelaxation] = {}
        self.linear: dict[int, LinearBounds] = {}

    @property
    def rows(self) -> int:
        return self.eps.shape[0]

    def run(self) -> Propagation:
        for index, op in enumerate(self.net.ops):
            if index in self.plan.exact:
                if index in self.prefix.coef:
                    self.linear[index] = LinearBounds.exact_function(
                        self.prefix.coef[index], self.prefix.const[index], self.prefix.magnitude[index]
                    )
                    self.box[index] = self.linear[index].concretize(self.eps, self.tau)
                continue
            if isinstance(op, (ReLU, MaxPool)):
                self._nonlinear(index, op)
            else:
                self._affine(index, op)
        return self

    # ---- one operation ---------------------------------------------------------------------------------------
    def _nonlinear(self, index: int, op: ReLU | MaxPool) -> None:
        source = op.inputs[0]
        lower, upper = self.box[source]
        if isinstance(op, ReLU):
            if index in self.splits:
                lower, upper = _apply_splits(lower, upper, self.splits[index])
            relax = ReluRelaxation.of(lower, upper)
            box = (lower.clamp(min=0.0), upper.clamp(min=0.0))
        else:
            relax = PoolRelaxation.of(op, lower, upper)
            box = (windows(lower, op, -torch.inf).amax(dim=1), windows(upper, op, -torch.inf).amax(dim=1))
        self.relax[index] = relax
        if index in self.plan.cut or self.intermediate == "forward":
            self.linear[index] = self._forward_nonlinear(op, relax, self.linear[source])
            box = _intersect(box, self.linear[index].concretize(self.eps, self.tau))
        self.box[index] = box

    def _affine(self, index: int, op: Affine) -> None:
        box = _interval_affine(op, [self.box[i] for i in op.inputs])
        if index in self.plan.direct or self.intermediate == "forward":
            self.linear[index] = _forward_affine(op, [self.linear[i] for i in op.inputs])
            box = _intersect(box, self.linear[index].concretize(self.eps, self.tau))
        elif index in self.plan.pre:
            box = _intersect(box, self._backward_box(index, op))
        self.box[index] = box

    def _forward_nonlinear(self, op: Op, relax, source: LinearBounds) -> LinearBounds:
        if isinstance(relax, ReluRelaxation):
            low, up = relax.lower_slope, relax.upper_slope
            return LinearBounds(
                low.unsqueeze(1) * source.lower_coef,
                low * source.lower_const,
                up.unsqueeze(1) * source.upper_coef,
                up * source.upper_const + relax.upper_shift,
                torch.maximum(low, up) * source.magnitude + relax.upper_shift.abs(),
            )
        assert isinstance(op, MaxPool)
        lower_coef = _pick(windows(source.lower_coef, op, 0.0), relax.lower_index.unsqueeze(1), dim=2)
        upper_coef = _pick(windows(source.upper_coef, op, 0.0), relax.upper_index.unsqueeze(1), dim=2)
        use = relax.upper_use.to(upper_coef.dtype)
        lower_const = _pick(windows(source.lower_const, op, 0.0), relax.lower_index, dim=1)
        upper_const = _pick(windows(source.upper_const, op, 0.0), relax.upper_index, dim=1)
        magnitude = windows(source.magnitude, op, 0.0).amax(dim=1) + relax.upper_shift.abs()
        return LinearBounds(
            lower_coef, lower_const, upper_coef * use.unsqueeze(1), upper_const * use + relax.upper_shift, magnitude
        )

    def _backward_box(self, index: int, op: Op) -> tuple[torch.Tensor, torch.Tensor]:
        """Concrete bounds of every neuron of operation `index` by backward passes (specifications e_i and -e_i)."""
        size = op.size
        lower = self.eps.new_empty(self.rows, size)
        upper = self.eps.new_empty(self.rows, size)
        chunk = max(1, self.spec_chunk // 2)
        for start in range(0, size, chunk):
            stop = min(size, start + chunk)
            eye = self.eps.new_zeros(stop - start, size)
            eye[torch.arange(stop - start), torch.arange(start, stop)] = 1.0
            lam = torch.cat([eye, -eye]).view(1, 2 * (stop - start), *op.shape).expand(self.rows, -1, *op.shape)
            bound = self.backward(index, lam).lower(self.eps, self.tau)  # [R, 2n]
            lower[:, start:stop] = bound[:, : stop - start]
            upper[:, start:stop] = -bound[:, stop - start :]
        return lower.view(self.rows, *op.shape), upper.view(self.rows, *op.shape)

    # ---- backward pass ---------------------------------------------------------------------------------------
    def backward(
        self,
        target: int,
        lam: torch.Tensor,
        cut: set[int] | None = None,
        lower_slopes: dict[int, torch.Tensor] | None = None,
    ) -> SpecBounds:
        """Linear lower bounds `coef z + const <= lam . h_target(z)` on the ball, for `lam: [R, n, *shape]` (n
        specifications). `cut`: where the pass stops (default the plan's cut; it needs those operations' linear
        bounds); `lower_slopes`: per-specification lower ReLU slopes {index: [R, n, *shape]} replacing the
        relaxation's (alpha-CROWN)."""
        cut = self.plan.cut if cut is None else cut
        rows, count = lam.shape[0], lam.shape[1]
        pending: dict[int, torch.Tensor] = {target: lam}
        const = lam.new_zeros(rows, count)
        magnitude = lam.new_zeros(rows, count)
        coef = None
        for index in range(target, -1, -1):
            weights = pending.pop(index, None)
            if weights is None:
                continue
            op = self.net.ops[index]
            if index in cut:
                part, shift, size = _at_cut(weights, self.linear[index])
                coef = part if coef is None else coef + part
                const, magnitude = const + shift, magnitude + size
            elif isinstance(op, Affine):
                const = const + op.bias_dot(weights)
                magnitude = magnitude + op.bias_abs_dot(weights)
                for source, back in zip(op.inputs, op.transpose(weights)):
                    pending[source] = back if source not in pending else pending[source] + back
            elif isinstance(op, ReLU):
                relax = self.relax[index]
                slope = relax.lower_slope.unsqueeze(1)
                if lower_slopes is not None and index in lower_slopes:
                    slope = torch.where(relax.unstable.unsqueeze(1), lower_slopes[index], slope)
                positive, negative = weights.clamp(min=0.0), weights.clamp(max=0.0)
                back = positive * slope + negative * relax.upper_slope.unsqueeze(1)
                const = const + _dot(negative, relax.upper_shift.unsqueeze(1))
                magnitude = magnitude + _dot(negative.abs(), relax.upper_shift.abs().unsqueeze(1))
                pending[op.inputs[0]] = back if op.inputs[0] not in pending else pending[op.inputs[0]] + back
            else:
                assert isinstance(op, MaxPool)
                back, shift, size = _pool_backward(op, self.relax[index], weights)
                const, magnitude = const + shift, magnitude + size
                pending[op.inputs[0]] = back if op.inputs[0] not in pending else pending[op.inputs[0]] + back
        if pending:
            raise RuntimeError(f"backward pass left operations {sorted(pending)} unbounded (plan without a cut)")
        assert coef is not None
        return SpecBounds(coef, const, magnitude)


@dataclass
class SpecBounds:
    """`coef z + const <= spec(z)` on the ball, per row and specification: coef [R, n, k], const and magnitude
    [R, n]."""

    coef: torch.Tensor
    const: torch.Tensor
    magnitude: torch.Tensor

    def lower(self, eps: torch.Tensor, tau: float) -> torch.Tensor:
        """The concrete lower bound [R, n] on the balls of radii `eps` [R], with the rounding allowance."""
        spread = eps.unsqueeze(1) * self.coef.norm(dim=2)
        return self.const - spread - tau * (self.magnitude + self.const.abs() + spread)

    def radius(self, eps: torch.Tensor, tau: float) -> torch.Tensor:
        """The largest r <= eps [R] with every specification's lower bound >= 0 on the r-ball (0 when a constant is
        not positive): `min_j (b_j - tau (M_j + |b_j|)) / ((1 + tau) ||a_j||)`, capped at eps."""
        head = self.const - tau * (self.magnitude + self.const.abs())
        norm = (1.0 + tau) * self.coef.norm(dim=2)
        ratio = torch.where(norm > 0, head / torch.where(norm > 0, norm, 1.0), torch.inf)
        ratio = torch.where(head > 0, ratio, 0.0)
        return torch.minimum(ratio.amin(dim=1), eps)


# ---- helpers --------------------------------------------------------------------------------------------------
def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sum of `a * b` over the per-sample dimensions (everything after [R, n])."""
    return (a * b).flatten(2).sum(-1)


def _at_cut(weights: torch.Tensor, bounds: LinearBounds) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`weights . h` bounded below by the linear bounds of h: (coef [R, n, k], const [R, n], magnitude [R, n])."""
    rows, count = weights.shape[:2]
    flat = weights.reshape(rows, count, -1)
    k = bounds.lower_coef.shape[1]
    if bounds.exact:
        coef = torch.bmm(flat, bounds.lower_coef.reshape(rows, k, -1).transpose(1, 2))
        const = torch.bmm(flat, bounds.lower_const.reshape(rows, -1, 1)).squeeze(2)
        size = torch.bmm(flat.abs(), bounds.magnitude.reshape(rows, -1, 1)).squeeze(2)
        return coef, const, size
    positive, negative = flat.clamp(min=0.0), flat.clamp(max=0.0)
    coef = torch.bmm(positive, bounds.lower_coef.reshape(rows, k, -1).transpose(1, 2))
    coef = coef + torch.bmm(negative, bounds.upper_coef.reshape(rows, k, -1).transpose(1, 2))
    const = torch.bmm(positive, bounds.lower_const.reshape(rows, -1, 1)).squeeze(2)
    const = const + torch.bmm(negative, bounds.upper_const.reshape(rows, -1, 1)).squeeze(2)
    size = torch.bmm(flat.abs(), bounds.magnitude.reshape(rows, -1, 1)).squeeze(2)
    return coef, const, size


def _pool_backward(
    op: MaxPool, relax: PoolRelaxation, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Through a max-pool's relaxation: the weights on its input [R, n, *in_shape], const and magnitude [R, n]."""
    positive, negative = weights.clamp(min=0.0), weights.clamp(max=0.0)
    rows, count = weights.shape[:2]
    area = op.kernel[0] * op.kernel[1]
    spread = weights.new_zeros(rows, count, area, *op.shape)
    lower_index = relax.lower_index.unsqueeze(1).unsqueeze(2).expand(rows, count, 1, *op.shape)
    upper_index = relax.upper_index.unsqueeze(1).unsqueeze(2).expand(rows, count, 1, *op.shape)
    use = relax.upper_use.to(weights.dtype).unsqueeze(1)
    spread.scatter_add_(2, lower_index, positive.unsqueeze(2))
    spread.scatter_add_(2, upper_index, (negative * use).unsqueeze(2))
    shift = relax.upper_shift.unsqueeze(1)
    return unwindows(spread, op), _dot(negative, shift), _dot(negative.abs(), shift.abs())


def _pick(values: torch.Tensor, index: torch.Tensor, dim: int) -> torch.Tensor:
    """`values` at `index` along `dim` (index broadcast over the other dimensions), that dimension removed."""
    shape = list(values.shape)
    shape[dim] = 1
    return values.gather(dim, index.unsqueeze(dim).expand(shape)).squeeze(dim)


def _forward_affine(op: Affine, sources: list[LinearBounds]) -> LinearBounds:
    """Linear bounds after an affine operation: exact inputs map exactly; otherwise centre and radius functions
    (`W mid`, `|W| rad`), which equals `W+ lower + W- upper` and `W+ upper + W- lower`."""
    magnitude = op.absolute([s.magnitude for s in sources])
    magnitude = magnitude + op.forward([torch.zeros_like(s.magnitude) for s in sources]).abs()
    if all(s.exact for s in sources):
        coef = op.linear([s.lower_coef for s in sources])
        return LinearBounds.exact_function(coef, op.forward([s.lower_const for s in sources]), magnitude)
    mid_coef = op.linear([(s.lower_coef + s.upper_coef) / 2.0 for s in sources])
    rad_coef = op.absolute([(s.upper_coef - s.lower_coef) / 2.0 for s in sources])
    mid_const = op.forward([(s.lower_const + s.upper_const) / 2.0 for s in sources])
    rad_const = op.absolute([(s.upper_const - s.lower_const) / 2.0 for s in sources])
    magnitude = magnitude + rad_const.abs()
    return LinearBounds(
        mid_coef - rad_coef, mid_const - rad_const, mid_coef + rad_coef, mid_const + rad_const, magnitude
    )


def _interval_affine(op: Affine, boxes: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Interval arithmetic: concrete bounds after an affine operation (centre `W mid + b`, radius `|W| rad`),
    moved outward by the rounding allowance."""
    mid = op.forward([(low + high) / 2.0 for low, high in boxes])
    rad = op.absolute([(high - low) / 2.0 for low, high in boxes])
    scale = op.absolute([torch.maximum(low.abs(), high.abs()) for low, high in boxes])
    scale = scale + op.forward([torch.zeros_like(low) for low, _ in boxes]).abs()
    slack = rounding_tau(mid.dtype) * (scale + rad)
    return mid - rad - slack, mid + rad + slack


def _intersect(
    a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.maximum(a[0], b[0]), torch.minimum(a[1], b[1])


def _apply_splits(lower: torch.Tensor, upper: torch.Tensor, split: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activation bounds under ReLU splits (+1: input >= 0, -1: input <= 0, 0: free)."""
    lower = torch.where(split > 0, lower.clamp(min=0.0), lower)
    upper = torch.where(split < 0, upper.clamp(max=0.0), upper)
    return lower, upper
