"""The original release's DeepFool *cost structure*, for speed comparisons only (REFERENCE §2 semantics).

`tests/deepfool_reference.py` is the lean per-sample loop the tests compare against: `torch.autograd.grad` with
respect to the input only. The release computes the same margins but pays more per step, and speed-ups "vs the
release" must count that: it calls `.backward()` once per candidate logit, reference class included (10 backward
passes per step instead of 9), and, as the model's parameters require gradients, every one of those passes also
computes and accumulates parameter gradients; it reads each gradient from `x.grad`, and projects with the dense
basis `[d, m]` per candidate. Measured here (1 thread): 1.5x the lean loop's time on LeNet, 1.9x on
ResNet-18-MNIST, with margins equal to 1e-6 relative.
"""

from __future__ import annotations

import torch
from torch import nn


def release_form_deepfool(
    model: nn.Module,
    image: torch.Tensor,
    basis: torch.Tensor | None,
    num_candidates: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 100,
) -> tuple[torch.Tensor, int]:
    """image: [C, H, W] in the model's input space; basis: [d, m] orthonormal or None (full space).
    Returns ((1 + overshoot) r [C, H, W], iterations). Parameter `.grad` fields are written, as in the release."""
    logits = model(image[None])[0]
    order = logits.argsort(descending=True)[:num_candidates]
    label = order[0]
    r = torch.zeros_like(image)
    loop_i, label_pert = 0, label
    while label_pert == label and loop_i < max_iter:
        point = (image + r).detach()[None].requires_grad_(True)
        fs = model(point)[0]
        fs[order[0]].backward(retain_graph=True)
        grad_orig = point.grad.clone()
        pert, w = torch.tensor(float("inf")), None
        for k in range(1, len(order)):
            point.grad.zero_()
            fs[order[k]].backward(retain_graph=True)
            w_k = point.grad.clone() - grad_orig
            f_k = (fs[order[k]] - fs[order[0]]).detach()
            projected = w_k.view(-1, 1) if basis is None else basis.T @ w_k.view(-1, 1)
            pert_k = f_k.abs() / projected.norm()
            if pert_k < pert:
                pert, w = pert_k, w_k
        if w is None:  # every projected gradient vanished
            return (1 + overshoot) * r, loop_i + 1
        if basis is not None:
            w = (basis @ (basis.T @ w.view(-1, 1))).view_as(image)
        r = r + pert.clamp(min=1e-4) * w.view_as(image) / w.norm()
        loop_i += 1
        label_pert = model((image + (1 + overshoot) * r)[None]).detach().argmax()
    return (1 + overshoot) * r, loop_i


def release_form_margins(model: nn.Module, x: torch.Tensor, bases: list[torch.Tensor | None]) -> torch.Tensor:
    """Margins [S, N] of `x: [N, C, H, W]` along each dense basis (None: full space), one run per (s, n) as the
    release does; the model is put in eval mode and its parameters require gradients, as when the release runs."""
    model.eval().requires_grad_(True)
    margins = torch.empty(len(bases), len(x), dtype=torch.float64)
    for s, basis in enumerate(bases):
        for n in range(len(x)):
            margins[s, n] = release_form_deepfool(model, x[n], basis)[0].norm().item()
    model.zero_grad(set_to_none=True)
    return margins
