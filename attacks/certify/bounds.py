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
that formed it (`|b|`, `eps ||a||`, and a magnitude of the constants: in a backward pass the absolute values of
every term it adds, in a forward layer that layer's `|W| |h| + |b|`) and `tau = 2**16` unit roundoffs of the dtype
(float64: 1.5e-11; float32: 7.8e-3). Relaxation lines are moved up by a few unit roundoffs of their endpoints so
that rounding of their slopes cannot cut into the function. This is an allowance sized far above the rounding of
float64 sums of the lengths met here (at most about 1e4 terms per dot product), not a worst-case error analysis
(which would compound |W| products over the depth).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from attacks.certify.graph import Affine, Input, MaxPool, Network, Op, ReLU

ROUNDING_UNITS = 2.0**16


def l2_norm(a: torch.Tensor, dim: int) -> torch.Tensor:
    """Euclidean norms of `a` along `dim`, as `sqrt(sum a^2)`: a few unit roundoffs from the exact value, covered by
    the rounding allowance (`torch.linalg.vector_norm` avoids overflow below 1e154, which bounds never reach, and is
    5x slower over the middle dimension of LeNet's [R, k, 1600] coefficients on CPU)."""
    return a.square().sum(dim).sqrt()


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
    _centre: tuple[torch.Tensor, ...] | None = field(default=None, repr=False)
    _norms: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @staticmethod
    def exact_function(
        coef: torch.Tensor, const: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor | None = None
    ) -> LinearBounds:
        return LinearBounds(coef, const, coef, const, magnitude, True, None, None if norm is None else (norm, norm))

    def norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(||lower_coef||, ||upper_coef||)` over z per neuron [R, *shape] (computed once)."""
        if self._norms is None:
            lower = l2_norm(self.lower_coef, 1)
            self._norms = (lower, lower if self.exact else l2_norm(self.upper_coef, 1))
        return self._norms

    def changed(self) -> None:
        """Forget what was computed from the coefficients (after writing into them)."""
        self._centre = self._norms = None

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

    def centre_radius(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The centre and half-width functions as matrices for backward passes (computed once): `[mid_coef^T |
        mid_const]` [R, N, k + 1] and `[rad_coef^T | rad_const | magnitude]` [R, N, k + 2] (N = the neurons)."""
        if self._centre is None:
            rows, k = self.lower_coef.shape[:2]
            lower, upper = self.lower_coef.reshape(rows, k, -1), self.upper_coef.reshape(rows, k, -1)
            low_const, up_const = self.lower_const.reshape(rows, 1, -1), self.upper_const.reshape(rows, 1, -1)
            mid = torch.cat([(lower + upper) / 2.0, (low_const + up_const) / 2.0], dim=1)
            rad = torch.cat(
                [(upper - lower) / 2.0, (up_const - low_const) / 2.0, self.magnitude.reshape(rows, 1, -1)], 1
            )
            self._centre = (mid.transpose(1, 2), rad.transpose(1, 2))
        return self._centre

    def concretize(self, eps: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Concrete bounds [R, *shape] on the balls of radii `eps` [R], moved outward by the rounding allowance."""
        lower_norm, upper_norm = self.norms()
        return concretized(eps, tau, self.lower_const, lower_norm, self.upper_const, upper_norm, self.magnitude)


def concretized(
    eps: torch.Tensor,
    tau: float,
    lower_const: torch.Tensor,
    lower_norm: torch.Tensor,
    upper_const: torch.Tensor,
    upper_norm: torch.Tensor,
    magnitude: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`lower_const - eps ||a_l||` and `upper_const + eps ||a_u||` [R, *shape] on balls of radii `eps` [R], each
    moved outward by `tau (magnitude + |const| + eps ||a||)`."""
    radius = eps.view((-1,) + (1,) * (lower_const.dim() - 1))
    lower_spread, upper_spread = radius * lower_norm, radius * upper_norm
    lower = lower_const - lower_spread - tau * (magnitude + lower_const.abs() + lower_spread)
    upper = upper_const + upper_spread + tau * (magnitude + upper_const.abs() + upper_spread)
    return lower, upper


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
    """Per output [R, C, oh, ow] of a max-pool: `h[lower_at] <= max <= h[upper_at] * upper_use + upper_shift`, with
    `lower_at`, `upper_at` the chosen inputs' flat positions in the pool's input, long [R, C*oh*ow]."""

    upper_use: torch.Tensor
    upper_shift: torch.Tensor
    lower_at: torch.Tensor
    upper_at: torch.Tensor

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
        positions = window_positions(op, lower.device)
        lower_at, upper_at = _flat_pick(positions, lower_index), _flat_pick(positions, upper_index)
        return PoolRelaxation(use, shift, lower_at, upper_at)


def windows(h: torch.Tensor, op: MaxPool, fill: float) -> torch.Tensor:
    """The pooling windows of `h: [..., C, H, W]` as `[..., m, C, oh, ow]` (m = kernel area; padding = `fill`)."""
    (kh, kw), (sh, sw), (ph, pw) = op.kernel, op.stride, op.padding
    channels, oh, ow = op.shape
    if _tiles(op):
        lead = h.shape[: h.dim() - 3]
        tiles = h.reshape(*lead, channels, oh, kh, ow, kw).movedim((-3, -1), (-5, -4))
        return tiles.reshape(*lead, kh * kw, channels, oh, ow)
    if ph or pw:
        h = torch.nn.functional.pad(h, (pw, pw, ph, ph), value=fill)
    parts = [
        h[..., i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw] for i in range(kh) for j in range(kw)
    ]
    return torch.stack(parts, dim=h.dim() - 3)


def _tiles(op: MaxPool) -> bool:
    """Whether the windows tile the input exactly (no overlap, no padding, nothing left over)."""
    _, height, width = op.in_shape
    _, oh, ow = op.shape
    return (
        op.stride == op.kernel and op.padding == (0, 0) and height == op.kernel[0] * oh and width == op.kernel[1] * ow
    )


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
    relu_only: set[int]  # operations read only by ReLUs (only their unstable neurons need tight bounds)
    last_reader: dict[int, int]  # the last operation reading each operation
    pools_only: set[int] = field(default_factory=set)  # operations read only by max-pools
    fused: set[int] = field(default_factory=set)  # ReLUs read only by one max-pool whose windows tile them

    def read_by_pools_only(self, index: int) -> bool:
        return index in self.pools_only

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
        relu_only = {i for i, users in readers.items() if all(isinstance(net.ops[u], ReLU) for u in users)}
        last_reader = {i: max(users) for i, users in readers.items()}
        pools_only = {i for i, users in readers.items() if all(isinstance(net.ops[u], MaxPool) for u in users)}
        fused = {
            i
            for i, users in readers.items()
            if isinstance(net.ops[i], ReLU) and len(users) == 1 and isinstance(net.ops[users[0]], MaxPool)
            and _tiles(net.ops[users[0]])
        }  # fmt: skip
        return Plan(exact, frontier, cut, direct, pre, relu_only, last_reader, pools_only, fused)


@dataclass
class Prefix:
    """The exact prefix's linear functions of z at the frontier operations, per row: `coef[i]` [R, k, *shape],
    `const[i]` [R, *shape] (= the operation's value at x0), `magnitude[i]` [R, *shape]."""

    coef: dict[int, torch.Tensor]
    const: dict[int, torch.Tensor]
    magnitude: dict[int, torch.Tensor]
    norm: dict[int, torch.Tensor] = field(default_factory=dict)  # ||coef|| over z [R, *shape]

    def with_rows(self, per_subspace: dict[int, torch.Tensor], position: torch.Tensor) -> Prefix:
        """This prefix with its coefficients gathered from `per_subspace` ({index: [U, k, *shape]}) at each row's
        subspace position `position` [R]."""
        norms = {i: l2_norm(t, 1)[position] for i, t in per_subspace.items()}
        return Prefix({i: t[position] for i, t in per_subspace.items()}, self.const, self.magnitude, norms)

    def select(self, rows: torch.Tensor) -> Prefix:
        return Prefix(
            {i: t[rows] for i, t in self.coef.items()},
            {i: t[rows] for i, t in self.const.items()},
            {i: t[rows] for i, t in self.magnitude.items()},
            {i: t[rows] for i, t in self.norm.items()},
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
        self.keep_linear: set[int] | None = None  # operations whose linear bounds outlive their readers (tests)
        self.lazy: dict[int, int] = {}  # ReLU index -> its exact input, linear bounds not formed (`_lazy`)
        self.owner: torch.Tensor | None = None  # a rows view's row of `linear` for each of its rows
        self.skip_off_lower = True  # no lower-bound pass for ReLU inputs proved <= 0 (`_backward_box`; tests: False)

    @property
    def rows(self) -> int:
        return self.eps.shape[0]

    def rows_view(self, index: torch.Tensor) -> Propagation:
        """This propagation's relaxations and exact linear bounds for rows `index` [D] (repeats allowed): enough for
        backward passes that stop at the exact prefix (`cut=plan.exact`)."""
        view = Propagation(self.net, self.plan, self.prefix, self.eps[index], self.intermediate, self.spec_chunk)
        view.relax = {i: _select_fields(r, index) for i, r in self.relax.items()}
        view.linear = {i: b for i, b in self.linear.items() if i in self.plan.exact}
        view.owner = index if self.owner is None else self.owner[index]
        return view

    def run(self) -> Propagation:
        """Every operation's bounds in topological order; linear bounds are kept only where a backward pass may
        stop (the cut) or a later operation still reads them."""
        keep = self.plan.cut if self.keep_linear is None else self.keep_linear
        for index, op in enumerate(self.net.ops):
            if index in self.plan.exact:
                if index in self.prefix.coef:
                    prefix = self.prefix
                    norm = prefix.norm.get(index)
                    self.linear[index] = LinearBounds.exact_function(
                        prefix.coef[index], prefix.const[index], prefix.magnitude[index], norm
                    )
                    self.box[index] = self.linear[index].concretize(self.eps, self.tau)
                continue
            if isinstance(op, (ReLU, MaxPool)):
                self._nonlinear(index, op)
            else:
                self._affine(index, op)
            for source in op.inputs:
                if self.plan.last_reader.get(source) == index and source not in keep:
                    self.linear.pop(source, None)
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
        if isinstance(op, ReLU) and self._lazy(index):
            self.lazy[index] = source  # its linear bounds stay implicit: slopes times the exact input's
            self.box[index] = _intersect(box, self._lazy_concretized(index))
            return
        self.linear[index] = self._forward_nonlinear(op, relax, source)
        self.box[index] = _intersect(box, self.linear[index].concretize(self.eps, self.tau))

    def _lazy(self, index: int) -> bool:
        """Whether the ReLU `index` needs no explicit linear bounds: its input is exact and only max-pools read it
        (they gather what they pick)."""
        source = self.net.ops[index].inputs[0]
        exact = source in self.linear and self.linear[source].exact
        keep = self.keep_linear is not None and index in self.keep_linear
        return exact and not keep and self.plan.read_by_pools_only(index)

    def _lazy_concretized(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        relax, source = self.relax[index], self.linear[self.lazy[index]]
        norm = source.norms()[0]
        low, up = relax.lower_slope, relax.upper_slope
        magnitude = torch.maximum(low, up) * source.magnitude + relax.upper_shift
        const = source.lower_const
        return concretized(self.eps, self.tau, low * const, low * norm, up * const + relax.upper_shift, up * norm,
                           magnitude)  # fmt: skip

    def _affine(self, index: int, op: Affine) -> None:
        box = _interval_affine(op, [self.box[i] for i in op.inputs])
        self.linear[index] = _forward_affine(op, [self.linear[i] for i in op.inputs])
        box = _intersect(box, self.linear[index].concretize(self.eps, self.tau))
        backward = self.intermediate == "backward" and index not in self.plan.direct
        if backward and index in self.plan.pre:
            needed = (
                (box[0] < 0) & (box[1] > 0)
                if index in self.plan.relu_only
                else torch.ones_like(box[0], dtype=torch.bool)
            )
            box = self._backward_box(index, op, box, needed)
        self.box[index] = box

    def _forward_nonlinear(self, op: Op, relax, source_index: int) -> LinearBounds:
        if isinstance(relax, ReluRelaxation):
            source = self.linear[source_index]
            low, up = relax.lower_slope, relax.upper_slope
            return LinearBounds(
                low.unsqueeze(1) * source.lower_coef,
                low * source.lower_const,
                up.unsqueeze(1) * source.upper_coef,
                up * source.upper_const + relax.upper_shift,
                torch.maximum(low, up) * source.magnitude + relax.upper_shift.abs(),
            )
        assert isinstance(op, MaxPool)
        lower_at, upper_at = relax.lower_at, relax.upper_at  # [R, C*oh*ow] flat input positions
        use = relax.upper_use.flatten(1).to(self.eps.dtype)
        shift = relax.upper_shift.flatten(1)
        if source_index in self.lazy:  # ReLU of an exact function: slopes times its coefficients
            relu, exact = self.relax[source_index], self.linear[self.lazy[source_index]]
            low = _gather_flat(relu.lower_slope, lower_at)
            up = _gather_flat(relu.upper_slope, upper_at) * use
            lower_coef = _gather_coef(exact.lower_coef, lower_at) * low.unsqueeze(1)
            upper_coef = _gather_coef(exact.lower_coef, upper_at) * up.unsqueeze(1)
            lower_const = _gather_flat(exact.lower_const, lower_at) * low
            upper_shift = _gather_flat(relu.upper_shift, upper_at) * use
            upper_const = _gather_flat(exact.lower_const, upper_at) * up + upper_shift + shift
            inner = torch.maximum(relu.lower_slope, relu.upper_slope) * exact.magnitude + relu.upper_shift
        else:
            source = self.linear[source_index]
            lower_coef = _gather_coef(source.lower_coef, lower_at)
            upper_coef = _gather_coef(source.upper_coef, upper_at) * use.unsqueeze(1)
            lower_const = _gather_flat(source.lower_const, lower_at)
            upper_const = _gather_flat(source.upper_const, upper_at) * use + shift
            inner = source.magnitude
        magnitude = torch.maximum(_gather_flat(inner, lower_at), _gather_flat(inner, upper_at)) + shift.abs()
        shape = (self.rows, *op.shape)
        k = lower_coef.shape[1]
        return LinearBounds(
            lower_coef.view(self.rows, k, *op.shape),
            lower_const.view(shape),
            upper_coef.view(self.rows, k, *op.shape),
            upper_const.view(shape),
            magnitude.view(shape),
        )

    def _backward_box(
        self, index: int, op: Op, box: tuple[torch.Tensor, torch.Tensor], needed: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`box` tightened by backward passes for the `needed` neurons (bool [R, *shape]): first the upper bounds
        (specification -e_i per needed neuron), then the lower bounds (e_i) of those that can still be positive.
        Where only ReLUs read the operation, a neuron whose upper bound is <= 0 is off on the whole ball: its ReLU
        is exactly 0 whatever its lower bound, so that bound is not computed (about a quarter of the needed
        neurons of the MNIST LeNets' fully connected layers)."""
        rows = self.rows
        flat_needed = needed.reshape(rows, -1)
        lower, upper = box[0].reshape(rows, -1).clone(), box[1].reshape(rows, -1).clone()
        self._tighten(index, op, flat_needed, upper, -1.0)
        if self.skip_off_lower and index in self.plan.relu_only:
            flat_needed = flat_needed & (upper > 0)
        self._tighten(index, op, flat_needed, lower, 1.0)
        return lower.view_as(box[0]), upper.view_as(box[1])

    def _tighten(self, index: int, op: Op, needed: torch.Tensor, values: torch.Tensor, sign: float) -> None:
        """`values` [R, size] (lower bounds for `sign` 1, upper bounds for -1) tightened in place where `needed`
        (bool [R, size]) by backward passes of `sign * e_i`, at most `spec_chunk` specifications per pass; rows pad
        their list of needed neurons. The operation's linear bounds on that side, if kept, become the passes'."""
        rows = self.rows
        counts = needed.sum(dim=1)
        most = int(counts.max()) if rows else 0
        if most == 0:
            return
        # the needed neurons of each row first (stable sort keeps their order), padded with unneeded ones
        order = torch.sort((~needed).to(torch.int8), dim=1, stable=True).indices[:, :most]
        valid = torch.arange(most, device=order.device).unsqueeze(0) < counts.unsqueeze(1)
        for start in range(0, most, self.spec_chunk):
            neurons = order[:, start : start + self.spec_chunk]  # [R, n]
            count = neurons.shape[1]
            lam = self.eps.new_zeros(rows, count, op.size)
            positions = torch.arange(count, device=neurons.device).unsqueeze(0).expand(rows, -1)
            lam[torch.arange(rows).unsqueeze(1), positions, neurons] = sign
            specs = self.backward(index, lam.view(rows, count, *op.shape))
            bound = sign * specs.lower(self.eps, self.tau)  # lower bound of e_i; minus the lower bound of -e_i
            ok = valid[:, start : start + self.spec_chunk]
            old = values.gather(1, neurons)
            tighter = torch.maximum(old, bound) if sign > 0 else torch.minimum(old, bound)
            values.scatter_(1, neurons, torch.where(ok, tighter, old))
            if index in self.linear:
                _write_side(self.linear[index], neurons, ok, specs, sign)

    # ---- backward pass ---------------------------------------------------------------------------------------
    def backward(
        self,
        target: int,
        lam: torch.Tensor,
        cut: set[int] | None = None,
        lower_slopes: dict[int, torch.Tensor] | None = None,
        record: dict[int, torch.Tensor] | None = None,
    ) -> SpecBounds:
        """Linear lower bounds `coef z + const <= lam . h_target(z)` on the ball, for `lam: [R, n, *shape]` (n
        specifications). `cut`: where the pass stops (default the plan's cut; it needs those operations' linear
        bounds); `lower_slopes`: per-specification lower ReLU slopes {index: [R, n, *shape]} replacing the
        relaxation's (alpha-CROWN); `record`: filled with the negative part of the weights reaching each ReLU
        ({index: [R, n, *shape]}, which the upper lines multiply; branch and bound scores neurons with it)."""
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
                part, shift, size = _at_cut(weights, self.linear[index], self.owner)
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
                negative = weights.clamp(max=0.0)
                if record is not None:
                    record[index] = negative
                back = weights * torch.where(weights < 0, relax.upper_slope.unsqueeze(1), slope)
                shift = _dot(negative, relax.upper_shift)  # <= 0: the shifts are >= 0
                const, magnitude = const + shift, magnitude - shift
                pending[op.inputs[0]] = back if op.inputs[0] not in pending else pending[op.inputs[0]] + back
            else:
                assert isinstance(op, MaxPool)
                source = op.inputs[0]
                relu = source in self.plan.fused and source not in cut and record is None
                relu = relu and (lower_slopes is None or source not in lower_slopes)
                if relu:  # through the max-pool and the ReLU it reads at once, at the pool's resolution
                    back, shift, size = _pool_relu_backward(op, self.relax[index], self.relax[source], weights)
                    source = self.net.ops[source].inputs[0]
                else:
                    back, shift, size = _pool_backward(op, self.relax[index], weights)
                const, magnitude = const + shift, magnitude + size
                pending[source] = back if source not in pending else pending[source] + back
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
        spread = eps.unsqueeze(1) * l2_norm(self.coef, 2)
        return self.const - spread - tau * (self.magnitude + self.const.abs() + spread)

    def radius(self, eps: torch.Tensor, tau: float) -> torch.Tensor:
        """The largest r <= eps [R] with every specification's lower bound >= 0 on the r-ball (0 when a constant is
        not positive): `min_j (b_j - tau (M_j + |b_j|)) / ((1 + tau) ||a_j||)`, capped at eps."""
        head = self.const - tau * (self.magnitude + self.const.abs())
        norm = (1.0 + tau) * l2_norm(self.coef, 2)
        ratio = torch.where(norm > 0, head / torch.where(norm > 0, norm, 1.0), torch.inf)
        ratio = torch.where(head > 0, ratio, 0.0)
        return torch.minimum(ratio.amin(dim=1), eps)


# ---- helpers --------------------------------------------------------------------------------------------------
def _select_fields(relax, index: torch.Tensor):
    """A relaxation with every per-row tensor field taken at rows `index`."""
    values = {name: value[index] if isinstance(value, torch.Tensor) else value for name, value in vars(relax).items()}
    return type(relax)(**values)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`sum a * b` over the per-sample dimensions for `a: [R, n, *shape]` and `b: [R, *shape]` (one `b` per row):
    [R, n]."""
    rows, count = a.shape[:2]
    return torch.bmm(a.reshape(rows, count, -1), b.reshape(rows, -1, 1)).view(rows, count)


def _at_cut(
    weights: torch.Tensor, bounds: LinearBounds, owner: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`weights . h` bounded below by the linear bounds of h: (coef [R, n, k], const [R, n], magnitude [R, n]), as
    `weights . mid - |weights| . rad` (equal to `w+ . lower + w- . upper`). `owner` [R]: the row of exact `bounds`
    each row of `weights` belongs to (rows views: the bounds are not repeated per row)."""
    if owner is not None:
        return _at_exact_cut_by_owner(weights, bounds, owner)
    rows, count = weights.shape[:2]
    flat = weights.reshape(rows, count, -1)
    k = bounds.lower_coef.shape[1]
    if bounds.exact:
        coef = torch.bmm(flat, bounds.lower_coef.reshape(rows, k, -1).transpose(1, 2))
        const = torch.bmm(flat, bounds.lower_const.reshape(rows, -1, 1)).squeeze(2)
        size = torch.bmm(flat.abs(), bounds.magnitude.reshape(rows, -1, 1)).squeeze(2)
        return coef, const, size
    mid, rad = bounds.centre_radius()
    centre, spread = torch.bmm(flat, mid), torch.bmm(flat.abs(), rad)  # [R, n, k + 1], [R, n, k + 2]
    coef = centre[..., :k] - spread[..., :k]
    return coef, centre[..., k] - spread[..., k], spread[..., k] + spread[..., k + 1]


def _at_exact_cut_by_owner(
    weights: torch.Tensor, bounds: LinearBounds, owner: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`_at_cut` for exact bounds shared by the rows of `weights` with the same `owner`: one product per owner."""
    if not bounds.exact:
        raise ValueError("a rows view stops only at exact operations (cut=plan.exact)")
    rows, count = weights.shape[:2]
    flat = weights.reshape(rows, count, -1)
    k = bounds.lower_coef.shape[1]
    coef = flat.new_empty(rows, count, k)
    const, size = flat.new_empty(rows, count), flat.new_empty(rows, count)
    for row in torch.unique(owner).tolist():
        members = (owner == row).nonzero().squeeze(1)
        part = flat[members].reshape(-1, flat.shape[2])
        coef[members] = (part @ bounds.lower_coef[row].reshape(k, -1).T).view(-1, count, k)
        const[members] = (part @ bounds.lower_const[row].reshape(-1)).view(-1, count)
        size[members] = (part.abs() @ bounds.magnitude[row].reshape(-1)).view(-1, count)
    return coef, const, size


def _pool_backward(
    op: MaxPool, relax: PoolRelaxation, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Through a max-pool's relaxation: the weights on its input [R, n, *in_shape], const and magnitude [R, n]. A
    weight w goes to the lower bound's input where w >= 0 and to the upper bound's (times `upper_use`) where w < 0,
    whose constant it multiplies."""
    rows, count = weights.shape[:2]
    flat = weights.reshape(rows, count, -1)
    negative = flat.clamp(max=0.0)
    back = flat.new_zeros(rows, count, math.prod(op.in_shape))
    back.scatter_add_(2, relax.lower_at.unsqueeze(1).expand(-1, count, -1), flat - negative)
    back.scatter_add_(
        2, relax.upper_at.unsqueeze(1).expand(-1, count, -1), negative * relax.upper_use.flatten(1).unsqueeze(1)
    )
    shift = _dot(negative, relax.upper_shift)
    return back.view(rows, count, *op.in_shape), shift, -_dot(negative, relax.upper_shift.abs())


def _pool_relu_backward(
    op: MaxPool, pool: PoolRelaxation, relu: ReluRelaxation, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Through a max-pool whose windows tile its input and the ReLU before it (read by nothing else): the weights on
    the ReLU's input [R, n, *in_shape], const and magnitude [R, n]. The same as `_pool_backward` then the ReLU's
    step, computed on the pool's outputs: each window passes its weight to at most two inputs (the lower bound's
    and, for a negative weight, the upper bound's; their sum where they are one input), and only those inputs'
    ReLU lines are applied before the weights are placed."""
    rows, count = weights.shape[:2]
    flat = weights.reshape(rows, count, -1)  # [R, n, P]
    negative = flat.clamp(max=0.0)
    use = pool.upper_use.flatten(1).unsqueeze(1)
    same = use & (pool.lower_at == pool.upper_at).unsqueeze(1)
    at_lower = torch.where(same, flat, flat - negative)  # the weight on the lower bound's input
    at_upper = torch.where(use & ~same, negative, 0.0)  # <= 0, on the upper bound's input where it is another
    picks = [(pool.lower_at, at_lower), (pool.upper_at, at_upper)]
    back = flat.new_zeros(rows, count, math.prod(op.in_shape))
    const, magnitude = _dot(negative, pool.upper_shift), -_dot(negative, pool.upper_shift.abs())
    for at, part in picks:
        lower_slope, upper_slope, upper_shift = (_gather_flat(t, at).unsqueeze(1) for t in
                                                 (relu.lower_slope, relu.upper_slope, relu.upper_shift))  # fmt: skip
        back.scatter_add_(
            2, at.unsqueeze(1).expand(-1, count, -1), part * torch.where(part < 0, upper_slope, lower_slope)
        )
        shift = _dot(part.clamp(max=0.0), upper_shift.squeeze(1))
        const, magnitude = const + shift, magnitude - shift
    return back.view(rows, count, *op.in_shape), const, magnitude


def _write_side(bounds: LinearBounds, neurons: torch.Tensor, ok: torch.Tensor, specs: SpecBounds, sign: float) -> None:
    """Replace one side of the linear bounds of `neurons` [R, n] (where `ok`) by those of backward passes (`specs`:
    lower bounds of `sign * e_i`: the lower side for `sign` 1, the upper side for -1), which concretise tighter."""
    rows, k = bounds.lower_coef.shape[:2]
    at = neurons.unsqueeze(1).expand(rows, k, -1)
    keep = ok.unsqueeze(1)
    coef, const = (bounds.lower_coef, bounds.lower_const) if sign > 0 else (bounds.upper_coef, bounds.upper_const)
    flat_coef, flat_const = coef.view(rows, k, -1), const.view(rows, -1)
    new_coef = sign * specs.coef.transpose(1, 2)
    flat_coef.scatter_(2, at, torch.where(keep, new_coef, flat_coef.gather(2, at)))
    flat_const.scatter_(1, neurons, torch.where(ok, sign * specs.const, flat_const.gather(1, neurons)))
    flat_magnitude = bounds.magnitude.view(rows, -1)
    old = flat_magnitude.gather(1, neurons)
    flat_magnitude.scatter_(1, neurons, torch.where(ok, torch.maximum(old, specs.magnitude), old))
    bounds.changed()


_POSITIONS: dict[tuple, torch.Tensor] = {}


def window_positions(op: MaxPool, device: torch.device) -> torch.Tensor:
    """The flat input position (in [C, H, W]) of every window element, long [m, C, oh, ow] (padding: 0, never
    picked since its bounds are -inf)."""
    key = (op.kernel, op.stride, op.padding, op.in_shape, op.shape, str(device))
    if key not in _POSITIONS:
        flat = torch.arange(math.prod(op.in_shape), device=device, dtype=torch.float64).view(1, *op.in_shape)
        _POSITIONS[key] = windows(flat, op, 0.0)[0].round().long()
    return _POSITIONS[key]


def _flat_pick(positions: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The flat input positions chosen by `index` [R, C, oh, ow] (window slots): long [R, C*oh*ow]."""
    expanded = positions.unsqueeze(0).expand(index.shape[0], *positions.shape)
    return expanded.gather(1, index.unsqueeze(1)).squeeze(1).flatten(1)


def _gather_flat(values: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """`values: [R, *shape]` at flat positions `at: [R, n]` -> [R, n]."""
    return values.flatten(1).gather(1, at)


def _gather_coef(coef: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """`coef: [R, k, *shape]` at flat positions `at: [R, n]` -> [R, k, n]."""
    flat = coef.flatten(2)
    return flat.gather(2, at.unsqueeze(1).expand(-1, flat.shape[1], -1))


def _forward_affine(op: Affine, sources: list[LinearBounds]) -> LinearBounds:
    """Linear bounds after an affine operation: exact inputs map exactly; otherwise centre and radius functions
    (`W mid`, `|W| rad`), which equals `W+ lower + W- upper` and `W+ upper + W- lower`. The magnitude is this
    layer's: `|W| max(|lower const|, |upper const|) + |b|` (carrying the inputs' magnitudes through |W| would grow
    like a product of |W| over the depth; the allowance is relative to each layer's terms, `rounding_tau`)."""
    sizes = [torch.maximum(s.lower_const.abs(), s.upper_const.abs()) for s in sources]
    magnitude = op.absolute(sizes) + op.forward([torch.zeros_like(size) for size in sizes]).abs()
    if all(s.exact for s in sources):
        coef = op.linear([s.lower_coef for s in sources])
        return LinearBounds.exact_function(coef, op.forward([s.lower_const for s in sources]), magnitude)
    mid_coef = op.linear([(s.lower_coef + s.upper_coef) / 2.0 for s in sources])
    rad_coef = op.absolute([(s.upper_coef - s.lower_coef) / 2.0 for s in sources])
    mid_const = op.forward([(s.lower_const + s.upper_const) / 2.0 for s in sources])
    rad_const = op.absolute([(s.upper_const - s.lower_const) / 2.0 for s in sources])
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
