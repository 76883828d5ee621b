"""Fourier heat map of a classifier (Yin et al., NeurIPS 2019).

For every 2-D frequency (i, j) of an H x W image, `U(i, j)` is the real Fourier basis image
`cos(2 pi (i y / H + j x / W))` scaled to unit L2 norm (its FFT is non-zero only at (i, j) and its conjugate twin
(-i, -j), so `U(i, j) = U(-i, -j)` and the map is point-symmetric: only one frequency of each twin pair is
evaluated). Each sample is perturbed to `valid(x + r * eps * U(i, j))`, `r` uniform in {-1, +1} per (frequency,
sample) from a seeded generator, and the map holds the model's error rate (prediction != ground-truth label).

Colour images: ONE basis image on all channels, scaled by 1/sqrt(C) so the whole perturbation [C, H, W] has L2 norm
`eps` (in the input space's units: [0, 1] pixels for plain data). `valid`: "box" clamps to [0, 1] (plain pixels);
"flipped_box" is for frequency-flipped data, perturbed in the data's own (flipped) space, the model's input
space, and made valid there as `flip(clamp(flip(z), 0, 1))` (a valid flipped image is the flip of a valid one);
"none" leaves inputs as they are (e.g. low-pass data, which has no box).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from common.errors import InputError
from frequency.transforms import flip

VALID_RANGES = ("box", "flipped_box", "none")
IMAGES_PER_PASS = 2048  # perturbed images per forward pass when none is given (`fourier_heatmap`'s batch_size)


@dataclass
class FourierHeatmap:
    """error: [H, W] error rate per frequency, UNSHIFTED (entry (i, j) is frequency (i, j) mod (H, W); NaN outside
    `radius`); eps: L2 norm of the perturbation; clean_error: error rate on the clean samples."""

    error: np.ndarray
    eps: float
    clean_error: float
    num_samples: int
    valid: str
    seed: int
    radius: int | None
    channel_mode: str = "one basis image on all channels, total L2 norm eps"

    def centred(self) -> np.ndarray:
        """The map with the zero frequency at the centre (`np.fft.fftshift`): row r is frequency r - H // 2."""
        return np.fft.fftshift(self.error)

    def settings(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "error"}


def signed_frequencies(n: int) -> torch.Tensor:
    """Frequency of each FFT index 0..n-1 in [-n//2, (n-1)//2] (numpy's fftfreq * n)."""
    return torch.from_numpy(np.fft.fftfreq(n, 1.0 / n).round().astype(np.int64))


def fourier_basis(height: int, width: int, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Unit-norm real Fourier basis images `[F, H, W]` (float64) for frequencies (rows[f], cols[f])."""
    y = torch.arange(height, dtype=torch.float64)[None, :, None]
    x = torch.arange(width, dtype=torch.float64)[None, None, :]
    phase = 2 * math.pi * (rows.double()[:, None, None] * y / height + cols.double()[:, None, None] * x / width)
    u = torch.cos(phase)
    return u / u.flatten(1).norm(dim=1)[:, None, None]


def representative_frequencies(height: int, width: int, radius: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """FFT indices (i, j) with one frequency per conjugate pair {(i, j), (-i, -j)}, inside `radius` (|freq| <=)."""
    i, j = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    twin = ((-i) % height) * width + (-j) % width
    keep = (i * width + j) <= twin
    if radius is not None:
        keep &= (signed_frequencies(height)[i].abs() <= radius) & (signed_frequencies(width)[j].abs() <= radius)
    return i[keep], j[keep]


def valid_range(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The map making perturbed inputs valid: "box" clamp to [0, 1], "flipped_box", or "none"."""
    if name == "box":
        return lambda z: z.clamp(0.0, 1.0)
    if name == "flipped_box":
        return lambda z: flip(flip(z).clamp(0.0, 1.0))
    if name == "none":
        return lambda z: z
    raise InputError(f"valid range must be one of {', '.join(VALID_RANGES)}, got {name!r}")


def frequency_bar(total: int, num_samples: int, enabled: bool) -> Any:
    """The heat map's bar: frequencies evaluated (each on every sample), on stderr; disabled: a no-op bar."""
    from tqdm.auto import tqdm

    description = f"Fourier heat map: frequencies (each on {num_samples} samples)"
    return tqdm(total=total, unit="frequency", desc=description, disable=not enabled, file=sys.stderr)


@torch.no_grad()
def fourier_heatmap(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    valid: str = "box",
    seed: int = 0,
    batch_size: int = IMAGES_PER_PASS,
    radius: int | None = None,
    progress: bool = False,
) -> FourierHeatmap:
    """Error rate of `model` on `x: [N, C, H, W]` (model input space) with labels `y: [N]` under
    `valid(x + r * eps * U(i, j))` for every frequency (i, j); batched over (frequency, sample) pairs,
    `batch_size` images per forward pass, on the model's device. `progress`: a bar over the frequencies evaluated
    (one per conjugate pair) on stderr. Returns a `FourierHeatmap`."""
    if not (math.isfinite(eps) and eps > 0) or batch_size < 1:
        raise InputError(f"eps must be a positive L2 norm and batch_size >= 1, got eps={eps}, batch={batch_size}")
    make_valid = valid_range(valid)
    device = next(model.parameters(), next(model.buffers(), x)).device
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    x, y = x.to(device), y.to(device)
    n, c, h, w = x.shape
    rows, cols = representative_frequencies(h, w, radius)
    signs = torch.randint(0, 2, (len(rows), n), generator=torch.Generator().manual_seed(seed)) * 2.0 - 1.0
    errors = torch.zeros(len(rows), dtype=torch.float64)
    per_chunk = max(1, batch_size // n)
    bar = frequency_bar(len(rows), n, progress)
    for start in range(0, len(rows), per_chunk):
        f = slice(start, start + per_chunk)
        basis = fourier_basis(h, w, rows[f], cols[f]).to(device=device, dtype=x.dtype) / math.sqrt(c)
        amplitude = (eps * signs[f]).to(device=device, dtype=x.dtype)  # [F, N]
        for s in range(0, n, batch_size):
            block = (
                x[None, s : s + batch_size] + amplitude[:, s : s + batch_size, None, None, None] * basis[:, None, None]
            )
            preds = model(make_valid(block.flatten(0, 1))).argmax(1).view(block.shape[:2])
            errors[f] += (preds != y[None, s : s + batch_size]).sum(1).double().cpu()
        bar.update(len(rows[f]))
    bar.close()
    clean_error = float((model(x).argmax(1) != y).double().mean())
    for module, flag in flags:  # every submodule's own mode back
        module.training = flag
    grid = np.full((h, w), np.nan)
    values = (errors / n).numpy()
    grid[rows.numpy(), cols.numpy()] = values
    grid[(-rows % h).numpy(), (-cols % w).numpy()] = values
    return FourierHeatmap(grid, float(eps), clean_error, n, valid, seed, radius)
