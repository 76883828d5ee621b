"""What every attack shares: its result types, the model's mode and device, and the arithmetic it records.

- `RowResult` ([R] fields, one per (sample, subspace) row) and `MarginResult` ([S, N] fields): what margin
  estimators return.
- `EvalMode(model)`: every submodule in eval mode inside the block, each one's own flag restored after.
- `tf32_off(device)`: TF32 off for CUDA matmuls and cuDNN convolutions inside the block.
- `model_device(model)`, `precision_record(device, dtype)`, `check_indices`, `checked_logits`, `progress_bar`.
"""

from __future__ import annotations

import contextlib
import platform
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RowResult:
    """A margin estimator's result for a list of (sample, subspace) rows, one entry per row.

    margins: [R] float, L2 norm of the returned perturbation (input-space units); converged: [R] bool, the label of
    `x + perturbation` differs from the clean label; iterations: [R] int64, steps taken; labels: [R] int64, clean
    predicted label of the row's sample (the reference class, not the ground truth); perturbed_labels: [R] int64,
    predicted label of `x + perturbation`; perturbations: [R, C, H, W] or None (only when requested).
    """

    margins: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    labels: torch.Tensor
    perturbed_labels: torch.Tensor
    perturbations: torch.Tensor | None = None


@dataclass
class MarginResult(RowResult):
    """A margin estimator's result for every (subspace s, sample n): `RowResult`'s fields as [S, N] (labels [N],
    perturbations [S, N, C, H, W] or None)."""


class EvalMode:
    """Puts every submodule in eval mode and restores each one's own flag on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc) -> None:
        for module, flag in self.flags:
            module.training = flag


@contextlib.contextmanager
def tf32_off(device: torch.device | str):
    """TF32 off for CUDA matmuls and cuDNN convolutions inside the block (restored afterwards); no-op elsewhere."""
    if torch.device(device).type != "cuda":
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """Device of the model's first parameter (else buffer), or `default` for a model without tensors."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device(default)


def precision_record(device: torch.device | str, dtype: torch.dtype | None = None) -> dict[str, str | bool | None]:
    """What a result file should store about the arithmetic of a margin run on `device` in `dtype` (the dtype
    the attack ran in, e.g. `result.margins.dtype`; None: float32): dtype name, TF32 use during the attack
    (False on CUDA, where the attack disables it; None elsewhere), device name (GPU or CPU model), torch version.
    Example: `{"dtype": "float32", "tf32": False, "device": "cuda: NVIDIA A100", "torch": "2.5.1"}`."""
    device = torch.device(device)
    on_cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if on_cuda else _cpu_name()
    return {
        "dtype": str(dtype or torch.float32).replace("torch.", ""),
        "tf32": False if on_cuda else None,
        "device": f"{device.type}: {name}",
        "torch": torch.__version__,
    }


def _cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else the platform's processor or machine name."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def check_indices(sample_index: torch.Tensor, subspace_index: torch.Tensor, num_samples: int, count: int) -> None:
    """ValueError unless the row indices `sample_index`, `subspace_index` ([R] each) lie in range."""
    if sample_index.shape != subspace_index.shape:
        raise ValueError("sample_index and subspace_index must have the same length (one entry per row)")
    if sample_index.numel() and (int(sample_index.min()) < 0 or int(sample_index.max()) >= num_samples):
        raise ValueError(f"sample_index must lie in [0, {num_samples})")
    if subspace_index.numel() and (int(subspace_index.min()) < 0 or int(subspace_index.max()) >= count):
        raise ValueError(f"subspace_index must lie in [0, {count})")


def checked_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`model(x)`, checked: logits [N, num_classes >= 2], finite (ValueError naming the problem otherwise)."""
    logits = model(x)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"model must return logits [N, num_classes >= 2], got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("model returned NaN or infinite logits; check the checkpoint and the inputs")
    return logits


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, enabled: bool, description: str):
    """A tqdm bar over `total` rows, or a bar that does nothing."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=description, unit="row")
