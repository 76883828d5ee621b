"""L2 PGD with MadryLab's conventions, for adversarial training on pixel or frequency-flipped data.

Random start on the eps sphere, normalised-gradient ascent steps `x + a * g / ||g||`, projection after every step
onto the L2 ball around the clean input intersected with the valid-image box ("ball_box": ball then box, as
standard PGD; "exact": the projection onto the intersection in closed form; "dykstra": the same by Dykstra's
algorithm, the paper's; "ball": no box).

Mixed precision: under autocast (`Trainer(precision="bf16-mixed" | "16-mixed")`) the model's forward and backward
passes run in the low precision; the projection, the gradient norms and the iterates stay in the inputs' dtype
(autocast off locally). Each sample's loss gradient is rescaled at the logits to a largest entry of 1 before the
backward pass, which leaves the normalised step unchanged and keeps float16 gradients of confident samples from
underflowing to zero.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attacks.common import EvalMode as _EvalMode
from attacks.dykstra import BoxProjection, Projection, project_box, project_flipped_box
from attacks.kernels.convolutions import NativeStemGradients
from frequency.transforms import flip

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""`loss(logits [B, K], y [B]) -> per-sample losses [B]` to be maximised."""
Forward = Callable[[torch.Tensor], torch.Tensor]
"""The model's forward pass, `x [B, C, H, W] -> logits [B, K]`."""

_BOX_TOLERANCE = 1e-4  # clean inputs may sit this far outside the box (float error of the flip round trip)


def cross_entropy_per_sample(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Default PGD loss: cross-entropy per sample, `[B, K], [B] -> [B]`."""
    return F.cross_entropy(logits, y, reduction="none")


class L2PGD:
    """L2 projected gradient ascent on the loss (untargeted), batched over samples.

    Args:
        eps: L2 radius in the model's input space (release: 2 MNIST, 1 CIFAR-10, 3 ImageNet).
        steps: number of gradient steps (>= 0).
        step_size: L2 length of each step; default `2.5 * eps / steps` (MadryLab).
        random_start: start uniformly on the eps sphere around `x` (then projected), else at `x`.
        projection: "ball_box" (ball then box, standard PGD), "exact" (the projection onto ball ∩ box in closed
            form), "dykstra" (the same by Dykstra's algorithm, to `dykstra_tol`), "ball" (no box), or any callable
            `proj(z, center, eps) -> [B, C, H, W]` (e.g. a `Projection`).
        flipped: inputs are frequency-flipped; the box is then `{z : flip(z) in [0, 1]^d}` (valid images in the
            original domain). Ignored when `projection` is a callable or `box` is given.
        box: custom Euclidean projection onto the validity set, `[B, ...] -> [B, ...]` (overrides `flipped`).
        dykstra_iters, dykstra_tol: `max_iter` and `tol` of `dykstra_projection`.
        loss: `loss(logits, y) -> [B]` per-sample losses to maximise (default: cross-entropy).
        use_best: return, per sample, the iterate with the highest loss (MadryLab's `use_best`) instead of the last.
        generator: default `torch.Generator` for the random start (same device as the inputs).
        native_stem_grad: on CPU, input gradients of image-stem convolutions (at most 4 input channels) come from
            PyTorch's native kernel instead of oneDNN's, 4x faster there (`attacks.kernels.convolutions`; LeNet's
            PGD step takes half the time). Values equal up to float rounding. A torch function mode on during the
            model's forward passes (`NativeStemGradients`): the model itself is not changed.

    Call: `attack(model, x, y, generator=None) -> x_adv` with `x: [B, C, H, W]` in the model's input space (pixels
    in [0, 1], or their flip when `flipped=True`; normalisation is inside the model) and `y: [B]` int64 labels.
    Returns `x_adv` detached, same shape/dtype/device as `x`, with `||x_adv - x||_2 <= eps` per sample and, for
    the box modes, `x_adv` valid. The model runs in eval mode and every submodule's own training flag is restored
    afterwards; nothing else about it changes (no patched method, no hook, the same state); gradients are taken
    w.r.t. the input only (parameter `.grad` is never written). Works when called under `torch.inference_mode()`
    or `torch.no_grad()`.
    """

    def __init__(
        self,
        eps: float,
        steps: int = 7,
        step_size: float | None = None,
        random_start: bool = True,
        projection: str | Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = "ball_box",
        flipped: bool = False,
        box: BoxProjection | None = None,
        dykstra_iters: int = 1000,
        dykstra_tol: float = 1e-6,
        loss: LossFn | None = None,
        use_best: bool = False,
        generator: torch.Generator | None = None,
        native_stem_grad: bool = True,
    ):
        if not eps >= 0 or eps == float("inf"):
            raise ValueError(f"eps must be a finite number >= 0, got {eps}")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}")
        self.eps = float(eps)
        self.steps = int(steps)
        self.step_size = 2.5 * self.eps / max(self.steps, 1) if step_size is None else float(step_size)
        if not self.step_size >= 0:
            raise ValueError(f"step_size must be >= 0, got {step_size}")
        self.random_start = bool(random_start)
        self.flipped = bool(flipped)
        if callable(projection):
            self.projection = projection
        else:
            self.projection = Projection(projection, flipped=flipped, box=box, max_iter=dykstra_iters, tol=dykstra_tol)
        self.loss = loss if loss is not None else cross_entropy_per_sample
        self.use_best = bool(use_best)
        self.generator = generator
        self.native_stem_grad = bool(native_stem_grad)

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if x.dim() != 4 or not x.is_floating_point():
            raise ValueError(f"x must be a float batch of images [B, C, H, W], got {x.dtype} {tuple(x.shape)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must hold one label per sample, shape ({x.shape[0]},), got {tuple(y.shape)}")
        generator = generator if generator is not None else self.generator
        forward: Forward = model
        stems = NativeStemGradients(model) if self.native_stem_grad and x.device.type == "cpu" else None
        if stems is not None and stems.weights:
            forward = _ForwardIn(model, stems)
        with torch.inference_mode(False), torch.enable_grad(), _EvalMode(model):
            x, y = x.detach().clone(), y.detach().clone()
            self._check_clean_input(x)
            return self._run(forward, x, y, generator)

    def _check_clean_input(self, x: torch.Tensor) -> None:
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or infinite values; check the data pipeline")
        if not isinstance(self.projection, Projection) or self.projection.mode == "ball":
            return
        box = self.projection.box
        if box is project_box or box is project_flipped_box:  # distance to [0, 1] of the pixels (one flip)
            pixels = flip(x) if box is project_flipped_box else x
            outside = (pixels - pixels.clamp(0.0, 1.0)).abs().max().item()
        else:
            outside = (box(x) - x).abs().max().item()
        if outside > _BOX_TOLERANCE:
            if self.projection.box is project_box:
                what = "x must be pixels in [0, 1] (normalisation belongs inside the model)"
            elif self.projection.box is project_flipped_box:
                what = "with flipped=True, flip(x) must be a valid image in [0, 1]"
            else:
                what = "x must lie in the set of the given `box` projection"
            raise ValueError(
                f"{what}; the clean input lies up to {outside:.3g} outside it. Pass projection='ball' (no validity "
                "constraint) or a custom `box` projection for other data."
            )

    def _run(self, model: Forward, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x_adv = self._start(x, generator)
        best_x, best_loss = None, None
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            logits, losses = self._losses(model, x_adv, y, keep_logits=True)
            (grad,) = torch.autograd.grad(logits, x_adv, _unit_logit_gradients(losses, logits))
            with torch.no_grad(), _full_precision(x.device):
                x_adv = x_adv.detach()
                if self.use_best:
                    best_x, best_loss = _keep_best(x_adv, losses.detach(), best_x, best_loss)
                x_adv = self.projection(x_adv + self.step_size * _normalize(grad), x, self.eps).detach()
        if self.use_best:
            with torch.no_grad():
                best_x, _ = _keep_best(x_adv, self._losses(model, x_adv, y), best_x, best_loss)
            x_adv = best_x
        return x_adv.detach()

    def _start(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not self.random_start or self.eps == 0:
            return x.clone()
        noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        with torch.no_grad(), _full_precision(x.device):
            start = x + self.eps * _normalize(noise)
            return self.projection(start, x, self.eps).detach()

    def _losses(
        self, model: Forward, x_adv: torch.Tensor, y: torch.Tensor, keep_logits: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Per-sample losses `[B]`; with `keep_logits`, `(logits, losses)`. Half-precision logits (autocast) are cast
        to float32 first, so that the loss and its gradient at the logits are float32 too."""
        logits = model(x_adv)
        if logits.dim() != 2 or logits.shape[0] != x_adv.shape[0]:
            raise ValueError(f"model must return logits [B, num_classes], got shape {tuple(logits.shape)}")
        if not torch.isfinite(logits).all():
            raise ValueError("model returned NaN or infinite logits; check the checkpoint and the inputs")
        if logits.dtype in (torch.float16, torch.bfloat16):
            logits = logits.float()
        losses = self.loss(logits, y)
        if losses.shape != (x_adv.shape[0],):
            raise ValueError(
                f"loss must return per-sample losses of shape ({x_adv.shape[0]},), got {tuple(losses.shape)}; "
                "use reduction='none'"
            )
        return (logits, losses) if keep_logits else losses

    def __repr__(self) -> str:
        return (
            f"L2PGD(eps={self.eps}, steps={self.steps}, step_size={self.step_size}, random_start={self.random_start}, "
            f"projection={self.projection!r}, use_best={self.use_best})"
        )


class _ForwardIn:
    """`model(x)` with a context (a torch function mode) on during the forward pass only."""

    def __init__(self, model: nn.Module, context: contextlib.AbstractContextManager):
        self.model, self.context = model, context

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with self.context:
            return self.model(x)


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast off on `device` while it is on (projections and norms in the tensors' own dtype), else a no-op."""
    if torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _unit_logit_gradients(losses: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """d losses.sum() / d logits `[B, K]`, each sample's row scaled to a largest |entry| of 1 (zero rows stay zero).

    A positive per-sample factor leaves the normalised input gradient's direction unchanged (samples are
    independent in eval mode); O(1) entries keep a float16 backward pass from flushing small gradients to zero
    (a confident sample's cross-entropy gradient, below 6e-8, would be zero in float16). `logits` are float32 here
    (`L2PGD._losses`), so the gradient at them is too.
    """
    (g,) = torch.autograd.grad(losses.sum(), logits, retain_graph=True)
    with torch.no_grad(), _full_precision(g.device):
        peak = g.abs().amax(dim=1, keepdim=True)
        return g / torch.where(peak > 0, peak, torch.ones_like(peak))


def _normalize(g: torch.Tensor) -> torch.Tensor:
    """Per-sample unit-L2 direction of `g: [B, ...]`; samples with a zero gradient get a zero step."""
    norm = g.flatten(1).norm(dim=1)
    ok = norm > 0
    scale = torch.where(ok, 1.0 / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(norm))
    return torch.where(ok.view(-1, *([1] * (g.dim() - 1))), g * scale.view(-1, *([1] * (g.dim() - 1))), 0.0)


def _keep_best(
    x: torch.Tensor, losses: torch.Tensor, best_x: torch.Tensor | None, best_loss: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample running argmax of the loss over iterates (ties keep the earlier iterate)."""
    if best_x is None:
        return x.clone(), losses.clone()
    better = losses > best_loss
    return torch.where(better.view(-1, 1, 1, 1), x, best_x), torch.where(better, losses, best_loss)
