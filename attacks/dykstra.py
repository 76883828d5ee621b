"""Projections for L2 PGD (REFERENCE §6): L2 ball, pixel box, rotated (frequency-flipped) box, and the exact
Euclidean projection onto ball ∩ box by Dykstra's alternating projection algorithm with its correction terms.

All functions are batched: `z, center: [B, ...]` (images `[B, C, H, W]`), one constraint set per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from frequency.transforms import flip

BoxProjection = Callable[[torch.Tensor], torch.Tensor]
"""Euclidean projection onto a closed convex set, `[B, ...] -> [B, ...]`, applied per sample."""

PROJECTION_MODES = ("ball", "ball_box", "dykstra")


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
        "ball_box": ball, then box (standard PGD; feasible but in general not the nearest feasible point).
        "dykstra": exact Euclidean projection onto ball ∩ box (`dykstra_projection`).

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
        return dykstra_projection(z, center, eps, self.box, max_iter=self.max_iter, tol=self.tol)

    def __repr__(self) -> str:
        box = getattr(self.box, "__name__", type(self.box).__name__)
        return f"Projection(mode={self.mode!r}, box={box}, max_iter={self.max_iter}, tol={self.tol})"
