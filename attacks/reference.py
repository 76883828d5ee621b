"""A straightforward per-sample, per-subspace subspace-constrained DeepFool with dense bases, written like the
original release: the independent reference of the tests and the per-sample baseline of the benchmarks.
Deliberately unoptimised.

`reference_deepfool(..., release_cost=False)` takes input gradients only (`torch.autograd.grad`: the lean loop);
`release_cost=True` pays what the release pays per step for the same margins: one `.backward()` per candidate logit,
reference class included (10 passes per step instead of 9), parameter gradients computed and accumulated in every
pass, each gradient read from `x.grad` and projected with the dense basis (1.5x the lean loop's time on LeNet,
1.9x on ResNet-18-MNIST, one thread). `reference_margins` runs it over a grid of samples and subspaces.
"""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
import torch
from torch import nn


def dct_block_basis(shape: tuple[int, int, int], start: int, block: int) -> torch.Tensor:
    """Dense orthonormal basis [d, block*block*C] (float64) of the DCT atoms in [start, start+block)^2, from scipy."""
    channels = shape[0]
    columns = []
    for c in range(channels):
        for u in range(start, start + block):
            for v in range(start, start + block):
                coeffs = np.zeros(shape)
                coeffs[c, u, v] = 1.0
                columns.append(sfft.idctn(coeffs, axes=(-2, -1), norm="ortho").ravel())
    return torch.from_numpy(np.stack(columns, axis=1))


def reference_deepfool(
    model: nn.Module,
    image: torch.Tensor,
    basis: torch.Tensor | None,
    num_candidates: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 100,
    release_cost: bool = False,
) -> tuple[torch.Tensor, int, bool]:
    """image: [C, H, W] in the model's input space; basis: [d, m] orthonormal or None (full space).
    Returns ((1 + overshoot) r [C, H, W], iterations, converged). With `release_cost` the model's parameters must
    require gradients and their `.grad` fields are written, as in the release."""
    logits = model(image[None])[0]
    order = logits.argsort(descending=True)[:num_candidates]
    label = order[0]
    r = torch.zeros_like(image)
    loop_i, label_pert = 0, label
    while label_pert == label and loop_i < max_iter:
        point = (image + r).detach()[None].requires_grad_(True)
        fs = model(point)[0]
        pert, w = float("inf"), None
        for w_k, f_k in _candidate_gradients(fs, order, point, release_cost):
            projected = w_k if basis is None else basis @ (basis.T @ w_k)
            pert_k = (f_k.abs() / projected.norm()).item()
            if pert_k < pert:
                pert, w = pert_k, projected
        if w is None:  # every projected gradient vanished: the sample cannot move
            loop_i += 1
            break
        r = r + (max(pert, 1e-4) * w / w.norm()).view_as(image)
        loop_i += 1
        with torch.no_grad():
            label_pert = model((image + (1 + overshoot) * r)[None]).argmax(dim=1)[0]
    return (1 + overshoot) * r, loop_i, bool(label_pert != label)


def _candidate_gradients(fs: torch.Tensor, order: torch.Tensor, point: torch.Tensor, release_cost: bool):
    """`(w_k, f_k - f_0)` for k = 1..K-1: flattened `grad f_k - grad f_0` at `point` and the logit gap."""
    if release_cost:
        fs[order[0]].backward(retain_graph=True)
        grad_orig = point.grad.clone()
    else:
        (grad_orig,) = torch.autograd.grad(fs[order[0]], point, retain_graph=True)
    for k in range(1, len(order)):
        if release_cost:
            point.grad.zero_()
            fs[order[k]].backward(retain_graph=True)
            grad = point.grad.clone()
        else:
            (grad,) = torch.autograd.grad(fs[order[k]], point, retain_graph=True)
        yield (grad - grad_orig).flatten(), (fs[order[k]] - fs[order[0]]).detach()


def reference_margins(
    model: nn.Module, x: torch.Tensor, bases: list[torch.Tensor | None], release_cost: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Margins and iterations [S, N] of `x: [N, C, H, W]` along each dense basis (None: full space), one run per
    (s, n); the model runs in eval mode (with `release_cost`: its parameters require gradients, which are cleared
    afterwards)."""
    model.eval()
    if release_cost:
        model.requires_grad_(True)
    margins = torch.empty(len(bases), len(x), dtype=torch.float64)
    iterations = torch.empty(len(bases), len(x), dtype=torch.long)
    for s, basis in enumerate(bases):
        basis = None if basis is None else basis.to(x)
        for n in range(len(x)):
            pert, iters, _ = reference_deepfool(model, x[n], basis, release_cost=release_cost)
            margins[s, n], iterations[s, n] = pert.norm().item(), iters
    if release_cost:
        model.zero_grad(set_to_none=True)
    return margins, iterations
