"""A straightforward per-sample, per-subspace subspace-constrained DeepFool, written from REFERENCE §2
with a dense basis matrix, like the original release. Used as the independent reference in tests and
in the benchmark; deliberately unoptimised."""

from __future__ import annotations

import numpy as np
import scipy.fft as sfft
import torch


def dct_block_basis(shape: tuple[int, int, int], start: int, block: int) -> torch.Tensor:
    """Dense orthonormal basis [d, block*block*C] of the DCT atoms in [start, start+block)^2, from scipy."""
    channels, height, width = shape
    columns = []
    for c in range(channels):
        for u in range(start, start + block):
            for v in range(start, start + block):
                coeffs = np.zeros(shape)
                coeffs[c, u, v] = 1.0
                columns.append(sfft.idctn(coeffs, axes=(-2, -1), norm="ortho").ravel())
    return torch.from_numpy(np.stack(columns, axis=1))


def reference_deepfool(
    model: torch.nn.Module,
    image: torch.Tensor,
    basis: torch.Tensor | None,
    num_candidates: int = 10,
    overshoot: float = 0.02,
    max_iter: int = 100,
) -> tuple[torch.Tensor, int, bool]:
    """image: [C, H, W]; basis: [d, m] orthonormal or None (full space).
    Returns ((1 + overshoot) r, iterations, converged)."""
    logits = model(image[None])[0]
    order = logits.argsort(descending=True)[:num_candidates]
    label = order[0]
    r = torch.zeros_like(image)
    loop_i, label_pert = 0, label
    while label_pert == label and loop_i < max_iter:
        point = (image + r).detach().requires_grad_(True)
        fs = model(point[None])[0]
        (grad_orig,) = torch.autograd.grad(fs[order[0]], point, retain_graph=True)
        pert, w = float("inf"), None
        for k in range(1, len(order)):
            (cur_grad,) = torch.autograd.grad(fs[order[k]], point, retain_graph=True)
            w_k = (cur_grad - grad_orig).flatten()
            f_k = (fs[order[k]] - fs[order[0]]).detach()
            if basis is not None:
                w_k = basis @ (basis.T @ w_k)
            pert_k = (f_k.abs() / w_k.norm()).item()
            if pert_k < pert:
                pert, w = pert_k, w_k
        if w is None:  # every projected gradient vanished: the sample cannot move
            loop_i += 1
            break
        r_i = max(pert, 1e-4) * w / w.norm()
        r = r + r_i.view_as(image)
        loop_i += 1
        with torch.no_grad():
            label_pert = model((image + (1 + overshoot) * r)[None]).argmax(dim=1)[0]
    return (1 + overshoot) * r, loop_i, bool(label_pert != label)
