"""What every margin estimator does around its algorithm: the prepared model, the checks on the rows and inputs,
the grid of (subspace, sample) rows, TF32 off on CUDA. `SubspaceDeepFool` and `SubspaceFMN` implement `_attack`."""

from __future__ import annotations

from collections.abc import Collection

import torch
from torch import nn

from attacks.common import MarginResult, RowResult, check_indices, model_device, tf32_off
from attacks.kernels import PreparedModel, prepare_model
from frequency.subspaces import FullSpace, SubspaceFamily


class MarginEstimator:
    """A margin estimator batched over (sample, subspace) rows.

    Call: `estimator(model, x, subspaces)` with `x: [N, C, H, W]` in the model's input space (pixels in [0, 1],
    normalisation inside the model) returns a `MarginResult` with `[S, N]` fields (subspaces default to the full
    input space); `estimator.attack_rows(model, x, subspaces, sample_index, subspace_index)` measures any list of
    (sample, subspace) rows (a shard of the grid) and returns a `RowResult` with `[R]` fields. `model` is a
    classifier (run on a prepared copy, the caller's model is never changed) or a model prepared once with
    `estimator.prepare(model)` for many calls.
    """

    def __init__(self, batch_size: int, dtype: torch.dtype | None, kernels: str | Collection[str]):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32, torch.float64 or None, got {dtype}")
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.kernels = kernels

    def settings(self) -> dict[str, object]:
        """The settings that determine the results, for result summaries."""
        raise NotImplementedError

    def prepare(self, model: nn.Module, device: torch.device | str | None = None) -> PreparedModel:
        """The working copy of `model` this estimator runs (`attacks.kernels.prepare_model` with its dtype and
        kernels); prepare once, attack many times."""
        return prepare_model(model, device, self.dtype, self.kernels)

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        subspaces: SubspaceFamily | None = None,
        return_perturbations: bool = False,
        progress: bool = False,
    ) -> MarginResult:
        """Margins of every sample `x: [N, C, H, W]` along every subspace: `MarginResult` with `[S, N]` fields."""
        if x.dim() != 4:
            raise ValueError(f"x must be a batch of images [N, C, H, W], got shape {tuple(x.shape)}")
        subspaces = subspaces if subspaces is not None else FullSpace(tuple(x.shape[1:]))
        num_samples, num_subspaces = x.shape[0], len(subspaces)
        rows = torch.arange(num_subspaces * num_samples)  # row = s * N + n
        out = self.attack_rows(
            model, x, subspaces, rows % num_samples, rows // num_samples, return_perturbations, progress
        )
        shape = (num_subspaces, num_samples)
        return MarginResult(
            margins=out.margins.view(shape),
            converged=out.converged.view(shape),
            iterations=out.iterations.view(shape),
            labels=out.labels[:num_samples],  # rows 0..N-1 are subspace 0 of samples 0..N-1
            perturbed_labels=out.perturbed_labels.view(shape),
            perturbations=None if out.perturbations is None else out.perturbations.view(*shape, *x.shape[1:]),
        )

    def attack_rows(
        self,
        model: nn.Module,
        x: torch.Tensor,
        subspaces: SubspaceFamily,
        sample_index: torch.Tensor,
        subspace_index: torch.Tensor,
        return_perturbations: bool = False,
        progress: bool = False,
    ) -> RowResult:
        """Margins of arbitrary (sample, subspace) rows: row i is sample `x[sample_index[i]]` along subspace
        `subspace_index[i]`. `x: [N, C, H, W]` in the model's input space; both indices int [R].

        A row's result depends only on its sample, its subspace and the model (up to float rounding from the
        batch composition), and the same call always gives the same bits. Returns a `RowResult` with [R] fields.
        """
        if x.dim() != 4:
            raise ValueError(f"x must be a batch of images [N, C, H, W], got shape {tuple(x.shape)}")
        subspaces.check_image_shape(tuple(x.shape[1:]))
        with torch.inference_mode(False):
            if not isinstance(model, PreparedModel):
                model = self.prepare(model, model_device(model, x.device))
            elif self.dtype is not None and model.dtype != self.dtype:
                raise ValueError(f"the model was prepared in {model.dtype}, this attack runs in {self.dtype}")
            device = model.device
            sample_index = torch.as_tensor(sample_index, dtype=torch.long).flatten().to(device)
            subspace_index = torch.as_tensor(subspace_index, dtype=torch.long).flatten().to(device)
            check_indices(sample_index, subspace_index, x.shape[0], len(subspaces))
            x = x.detach().to(device=device, dtype=model.dtype, copy=True)
            if not torch.isfinite(x).all():
                raise ValueError("inputs contain NaN or infinite values; check the data pipeline")
            with torch.enable_grad(), tf32_off(device):
                return self._attack(model, x, subspaces, sample_index, subspace_index, return_perturbations, progress)

    def _attack(
        self,
        model: PreparedModel,
        x: torch.Tensor,
        subspaces: SubspaceFamily,
        sample_index: torch.Tensor,
        subspace_index: torch.Tensor,
        return_perturbations: bool,
        progress: bool,
    ) -> RowResult:
        """The algorithm on checked rows: `model` prepared, `x` on its device in its dtype, gradients on;
        `subspaces` as the caller gave them (`subspaces.to(model.device)` for the algorithm: the prepared model
        caches what it builds per family object)."""
        raise NotImplementedError
