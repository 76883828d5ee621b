"""Projections for L2 PGD: L2 ball, pixel box, rotated (frequency-flipped) box, and the Euclidean projection onto
ball ∩ box, exactly in closed form (`exact_projection`) or by Dykstra's alternating projection algorithm with its
correction terms (`dykstra_projection`, the algorithm of the paper's release for flipped data).

All functions are batched: `z, center: [B, ...]` (images `[B, C, H, W]`), one constraint set per sample.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import torch

from frequency.transforms import _flip_matrix, flip

BoxProjection = Callable[[torch.Tensor], torch.Tensor]
"""Euclidean projection onto a closed convex set, `[B, ...] -> [B, ...]`, applied per sample."""

PROJECTION_MODES = ("ball", "ball_box", "exact", "dykstra")


def _eps_tensor(eps: float | torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Radius as a `[B]` tensor with `z`'s dtype and device; rejects negative or non-finite values."""
    eps_t = torch.as_tensor(eps, dtype=z.dtype, device=z.device)
    if eps_t.dim() == 0:
        eps_t = eps_t.expand(z.shape[0])
    if eps_t.shape != (z.shape[0],):
        raise ValueError(f"eps must be a float or a [B] tensor with B={z.shape[0]}, got shape {tuple(eps_t.shape)}")
    if not torch.isfinite(eps_t).all() or (eps_t < 0).any():
        raise ValueError(f"eps must be finite and >= 0, got {eps_t.tolist()}")
    return eps_t


def _check_pair(z: torch.Tensor, center: torch.Tensor) -> None:
    if z.shape != center.shape or z.dim() < 2:
        raise ValueError(
            f"z and center must be batches [B, ...] of the same shape, got {tuple(z.shape)} and {tuple(center.shape)}"
        )
    if not z.is_floating_point():
        raise TypeError(f"projections need floating-point tensors, got {z.dtype}; convert with .float() first")


def _per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape `[B]` to `[B, 1, ..., 1]` to broadcast against `like: [B, ...]`."""
    return v.view(-1, *([1] * (like.dim() - 1)))


def project_l2_ball(z: torch.Tensor, center: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
    """Projection of `z: [B, ...]` onto `{u : ||u - center||_2 <= eps}` per sample (`eps`: float or `[B]`).

    Points already inside the ball are returned unchanged (bit for bit).
    """
    _check_pair(z, center)
    eps_t = _eps_tensor(eps, z)
    diff = z - center
    norm = diff.flatten(1).norm(dim=1)
    outside = norm > eps_t
    scale = torch.where(outside, eps_t / torch.where(outside, norm, torch.ones_like(norm)), torch.ones_like(norm))
    return torch.where(_per_sample(outside, z), center + diff * _per_sample(scale, z), z)


def project_box(z: torch.Tensor, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """Projection onto the box `[lo, hi]^d` (elementwise clamp); `z: [B, ...]`."""
    if lo > hi:
        raise ValueError(f"empty box: lo={lo} > hi={hi}")
    return z.clamp(lo, hi)


def project_flipped_box(z: torch.Tensor) -> torch.Tensor:
    """Projection onto the rotated box `{u : flip(u) in [0, 1]^d}` of frequency-flipped images.

    `z: [B, C, H, W]` in the flipped representation. As `flip` is orthogonal and self-inverse, the projection is
    `flip(clamp(flip(z), 0, 1))`. Samples already inside are returned unchanged (exactly idempotent).
    """
    if z.dim() < 3:
        raise ValueError(f"project_flipped_box needs images [B, ..., H, W], got shape {tuple(z.shape)}")
    z_orig = flip(z)
    inside = ((z_orig >= 0) & (z_orig <= 1)).flatten(1).all(dim=1)
    return torch.where(_per_sample(inside, z), z, flip(z_orig.clamp(0.0, 1.0)))


def exact_projection(
    z: torch.Tensor,
    center: torch.Tensor,
    eps: float | torch.Tensor,
    flipped: bool = False,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Euclidean projection of `z: [B, ...]` onto `{||u - center||_2 <= eps} ∩ {valid images}`, in closed form.

    Valid images: `u in [0, 1]^d`, or with `flipped=True` (`z: [B, C, H, W]` frequency-flipped) `flip(u) in [0, 1]^d`.
    The flip is orthogonal and its own inverse, so the projection is `flip(P(flip(z)))` with P the projection onto
    ball ∩ box around `u0 = flip(center)` in pixel space: two flips per call (three with the center's). By the KKT
    conditions `P(v) = clip((v + λ u0) / (1 + λ), 0, 1) = clip(u0 + t (v - u0), 0, 1)` with `t = 1 / (1 + λ)` the
    largest `t` in [0, 1] that keeps it in the ball (λ >= 0 the ball's multiplier), found per sample to the
    arithmetic's precision by `_largest_feasible_step`.

    The center is assumed valid (a clean image); it is clamped to the box in pixel space, which moves a flipped
    center by its rounding error only. Samples already in the set are returned unchanged (bit for bit), samples
    with `eps = 0` get `center`. Arithmetic in `z`'s dtype (float32 for half-precision inputs): exact to float64
    rounding in float64; in float32 to its rounding, and to 1e-6 on flipped data on CPU (`_fast_flip`). The result
    has `z`'s dtype; runs under `torch.no_grad` (the result is detached).

    Args:
        z, center: `[B, ...]` floating tensors on the same device (`[B, ..., H, W]` when flipped).
        eps: ball radius, float or `[B]`.
        flipped: the box is the rotated box of frequency-flipped images.
        return_info: also return `iterations: [B]` (int64), the root finder's Newton steps per sample.
    """
    _check_pair(z, center)
    if flipped and z.dim() < 3:
        raise ValueError(f"exact_projection(flipped=True) needs images [B, ..., H, W], got shape {tuple(z.shape)}")
    with torch.no_grad():
        z, center = z.detach(), center.detach()
        eps_t = _eps_tensor(eps, z)
        dtype = torch.promote_types(z.dtype, torch.float32)
        zw, cw = z.to(dtype), center.to(dtype)
        v = (_fast_flip(zw) if flipped else zw).flatten(1)  # pixel space
        u0 = (_fast_flip(cw) if flipped else cw).flatten(1).clamp(0.0, 1.0)
        eps_w = eps_t.to(dtype)
        step = v - u0
        step_sq = step * step
        inside = (step_sq.sum(dim=1) <= eps_w * eps_w) & (v.amin(dim=1) >= 0) & (v.amax(dim=1) <= 1)
        t, iterations = _largest_feasible_step(step, step_sq, u0, eps_w, count=return_info)
        p = torch.addcmul(u0, t.unsqueeze(1), step).clamp_(0.0, 1.0).view(z.shape)
        out = (_fast_flip(p) if flipped else p).to(z.dtype)
        if bool(inside.any()):
            out = torch.where(_per_sample(inside, z), z, out)
        if bool((eps_t == 0).any()):
            out = torch.where(_per_sample(eps_t == 0, z), center, out)
    if return_info:
        return out, iterations
    return out


@lru_cache(maxsize=8)
def _flip_matrix_float32(n: int) -> torch.Tensor:
    """`D^T J D: [n, n]` (symmetric), built in float64 and rounded to float32, on CPU."""
    return _flip_matrix(n, "cpu").float()


def _fast_flip(x: torch.Tensor) -> torch.Tensor:
    """`flip(x)` of `x: [..., H, W]`. Float32 CPU tensors take float32 products instead of float64 sums: 3x faster
    (a LeNet PGD step on flipped MNIST -5 to -9%), accurate to 1e-6 instead of float32 rounding. Elsewhere `flip`
    itself (on GPUs a float32 product may run in TF32, off by 1e-3)."""
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return flip(x)
    return _flip_matrix_float32(x.shape[-2]) @ (x @ _flip_matrix_float32(x.shape[-1]))


def _largest_feasible_step(
    step: torch.Tensor, step_sq: torch.Tensor, u0: torch.Tensor, eps: torch.Tensor, count: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Largest `t` in [0, 1] with `||clip(u0 + t step, 0, 1) - u0|| <= eps`, per row; `step, u0: [B, d]` with `u0`
    in [0, 1], `step_sq = step * step`, `eps: [B]` (same dtype). Returns `t: [B]` and, with `count`, the Newton steps
    per row `[B]` (int64).

    Coordinate i moves by `t |step_i|` until it reaches the face of the box it heads for, at `t_i = room_i / |step_i|`
    (its knee), and then stays. So `phi(s) = ||clip(u0 + sqrt(s) step, 0, 1) - u0||^2` is continuous, piecewise
    linear and concave in `s = t^2`: `phi = s A + C`, with `A` the sum of `step_i^2` over the coordinates still
    moving and `C` the sum of `room_i^2` over the others. Newton's method on `phi(s) = eps^2` from `s = 0` solves
    the current segment, `s' = (eps^2 - C) / A` (its first step is the ball's projection, `t = eps / ||step||`). By
    concavity it never passes the root, so every iterate is feasible, and it ends, exactly, on the first segment
    that contains the root: once `A` stops changing (at most d + 1 steps; 1 to 3 on PGD iterates). A row that has
    converged keeps its `t` (its segment, hence its update, no longer changes), so rows are independent.
    """
    mask, product = torch.empty_like(step), torch.empty_like(step)  # reused buffers: no allocation per step
    room = (0.5 - u0).mul_(torch.sign(step, out=mask)).add_(0.5)  # 1 - u0 where step > 0, u0 where step < 0
    knee = room / torch.abs(step, out=product)  # +inf where step = 0: never stops (and never moves)
    room_sq = room.mul_(room)
    eps_sq = (eps * eps).unsqueeze(1)
    t = torch.zeros_like(eps_sq)
    slope_before = None
    steps = torch.zeros(step.shape[0], dtype=torch.long, device=step.device) if count else None
    for _ in range(step.shape[1] + 2):
        torch.gt(knee, t, out=mask)  # 1.0 while t < knee (a float mask: bool masks are slow on CPU)
        slope = torch.mul(step_sq, mask, out=product).sum(dim=1, keepdim=True)  # A
        if slope_before is not None:
            if torch.equal(slope, slope_before):
                break
            if count:
                steps += (slope != slope_before).squeeze(1)
        torch.le(knee, t, out=mask)
        reached = torch.mul(room_sq, mask, out=product).sum(dim=1, keepdim=True)  # C
        # A = 0 (nothing moves): any t fits, 1 (0 / 0 and x / 0 both become 1)
        t_next = (eps_sq - reached).clamp_(min=0.0).div_(slope).sqrt_().nan_to_num_(nan=1.0, posinf=1.0)
        t = torch.maximum(t_next.clamp_(max=1.0), t)  # never back: rounding may put the root a hair below t
        slope_before = slope
    if count:
        steps += 1
    return t.squeeze(1), steps


def dykstra_projection(
    z: torch.Tensor,
    center: torch.Tensor,
    eps: float | torch.Tensor,
    project_set_b: BoxProjection = project_box,
    max_iter: int = 1000,
    tol: float = 1e-6,
    return_info: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact Euclidean projection of `z: [B, ...]` onto `{||u - center||_2 <= eps} ∩ B` by Dykstra's algorithm.

    Boyle-Dykstra iteration with correction terms `p` (ball) and `q` (set B), started at `x = z, p = q = 0`::

        y = P_ball(x + p);  p = x + p - y
        x = P_B(y + q);     q = y + q - x

    `x` and `y` converge to the projection when the intersection is non-empty (always the case when `center`
    lies in B, e.g. a clean valid image). A sample stops (and is frozen, so results do not depend on batch-mates)
    once both the change of `x` and the gap `||x - y||` fall below `tol * (eps + ||center||)`, with `tol` floored
    at 8 machine epsilons of the dtype. The result is `P_ball(x)`: with `center` in B this point lies exactly in
    the ball and (by convexity of B) in B, and it differs from `x` by at most the final gap.

    Args:
        z, center: `[B, ...]` floating tensors on the same device (any float dtype, CPU or CUDA).
        eps: ball radius, float or `[B]`.
        project_set_b: Euclidean projection onto the convex set B (`project_box`, `project_flipped_box`, ...).
        max_iter: at most this many Dykstra sweeps per sample.
        tol: relative stopping tolerance.
        return_info: also return `iterations: [B]` (int64) and `converged: [B]` (bool).

    Not differentiable (runs under `torch.no_grad`); the result is detached.
    """
    _check_pair(z, center)
    if max_iter < 1 or tol <= 0:
        raise ValueError(f"max_iter must be >= 1 and tol > 0, got max_iter={max_iter}, tol={tol}")
    with torch.no_grad():
        z, center = z.detach(), center.detach()
        eps_t = _eps_tensor(eps, z)
        tol_eff = max(float(tol), 8 * torch.finfo(z.dtype).eps)
        threshold = tol_eff * (eps_t + center.flatten(1).norm(dim=1))  # [B]

        x = z.clone()
        p = torch.zeros_like(z)
        q = torch.zeros_like(z)
        iterations = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)
        converged = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
        active = torch.arange(z.shape[0], device=z.device)

        for _ in range(max_iter):
            if active.numel() == 0:
                break
            full = active.numel() == z.shape[0]  # no gather/scatter while every sample is still running
            xa, pa, qa = (x, p, q) if full else (x[active], p[active], q[active])
            ca, ea, ta = (center, eps_t, threshold) if full else (center[active], eps_t[active], threshold[active])
            ya = project_l2_ball(xa + pa, ca, ea)
            pa = xa + pa - ya
            x_new = project_set_b(ya + qa)
            qa = ya + qa - x_new
            change = (x_new - xa).flatten(1).norm(dim=1)
            gap = (x_new - ya).flatten(1).norm(dim=1)
            if full:
                x, p, q = x_new, pa, qa
            else:
                x[active], p[active], q[active] = x_new, pa, qa
            iterations[active] += 1
            done = (change <= ta) & (gap <= ta)
            converged[active] = done
            active = active[~done]

        result = project_l2_ball(x, center, eps_t)
    if return_info:
        return result, iterations, converged
    return result


class Projection:
    """Projection onto the PGD feasible set around a clean input, as a callable `proj(z, center, eps)`.

    Modes:
        "ball": the L2 ball only (no validity constraint).
        "ball_box": ball, then box (standard PGD, MadryLab's; feasible but in general not the nearest feasible
            point, on plain and on flipped data alike).
        "exact": the Euclidean projection onto ball ∩ box in closed form (`exact_projection`), to float64
            rounding; the pixel box or, with `flipped=True`, the rotated box (no custom `box`).
        "dykstra": the Euclidean projection onto ball ∩ box by Dykstra's algorithm (`dykstra_projection`), the
            paper's algorithm for flipped data; iterative, to `tol`, and any convex `box`.

    The box is `box` if given (any Euclidean projection `[B, ...] -> [B, ...]` onto a convex set), else the pixel
    box `[0, 1]^d` (`project_box`), or with `flipped=True` the rotated box of frequency-flipped images
    (`project_flipped_box`, i.e. `flip(z) in [0, 1]^d`).

    Call: `z, center: [B, C, H, W]`, `eps`: float or `[B]`; returns the projected `[B, C, H, W]`.
    """

    def __init__(
        self,
        mode: str = "ball_box",
        flipped: bool = False,
        box: BoxProjection | None = None,
        max_iter: int = 1000,
        tol: float = 1e-6,
    ):
        if mode not in PROJECTION_MODES:
            raise ValueError(f"projection mode must be one of {PROJECTION_MODES}, got {mode!r}")
        if box is not None and not callable(box):
            raise TypeError(f"box must be a callable projection [B, ...] -> [B, ...], got {type(box).__name__}")
        if box is not None and mode == "exact":
            raise ValueError(
                "projection mode 'exact' handles the [0, 1] box (flipped=True: the rotated box) only; "
                "use mode 'dykstra' for a custom box"
            )
        if max_iter < 1 or tol <= 0:
            raise ValueError(f"max_iter must be >= 1 and tol > 0, got max_iter={max_iter}, tol={tol}")
        self.mode = mode
        self.flipped = bool(flipped)
        self.box: BoxProjection = box if box is not None else (project_flipped_box if flipped else project_box)
        self.max_iter = int(max_iter)
        self.tol = float(tol)

    def __call__(self, z: torch.Tensor, center: torch.Tensor, eps: float | torch.Tensor) -> torch.Tensor:
        if self.mode == "ball":
            return project_l2_ball(z, center, eps)
        if self.mode == "ball_box":
            return self.box(project_l2_ball(z, center, eps))
        if self.mode == "exact":
            return exact_projection(z, center, eps, flipped=self.flipped)
        return dykstra_projection(z, center, eps, self.box, max_iter=self.max_iter, tol=self.tol)

    def __repr__(self) -> str:
        box = getattr(self.box, "__name__", type(self.box).__name__)
        return f"Projection(mode={self.mode!r}, box={box}, max_iter={self.max_iter}, tol={self.tol})"
