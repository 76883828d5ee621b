"""What every margin estimator does around its algorithm: the prepared model, the checks on the rows and inputs,
the grid of (subspace, sample) rows, TF32 off on CUDA, the clean top classes, and the hook that reports model passes.
`SubspaceDeepFool` and `SubspaceFMN` implement `_attack`.

- `RowTask`: the checked rows an estimator's algorithm receives.
- `PassObserver`: what an estimator reports of its model passes (nothing by default); `PassStats` counts them, for
  benchmarks (`estimator.observer = PassStats(estimator.batch_size)`).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field

import torch
from torch import nn

from attacks.common import MarginResult, RowResult, check_indices, checked_logits, model_device, tf32_off
from attacks.kernels import PreparedModel, prepare_model
from frequency.subspaces import FullSpace, SubspaceFamily


@dataclass(frozen=True)
class RowTask:
    """Checked rows for an estimator's algorithm: `model` prepared, `x: [N, C, H, W]` on its device in its dtype,
    `subspaces` as the caller gave them (the prepared model caches what it builds per family object; use
    `subspaces.to(model.device)` for arithmetic), row i = sample `sample_index[i]` along subspace
    `subspace_index[i]` (long [R] on the device), whether to return perturbations, whether to show a progress bar."""

    model: PreparedModel
    x: torch.Tensor
    subspaces: SubspaceFamily
    sample_index: torch.Tensor
    subspace_index: torch.Tensor
    return_perturbations: bool
    progress: bool


class PassObserver:
    """What a margin estimator reports of its model passes, one call per pass; this one ignores them. Attach another
    to an estimator (`estimator.observer = ...`) to count or time them (`PassStats`)."""

    def model_pass(self, kind: str, images: int, route: str = "input") -> None:
        """A pass over `images` points. kind: "clean" (no-grad forward of clean images, for the top classes),
        "gradient" (a forward and its input-gradient backward passes; `route`: where they stopped, "input" or
        "stem", `SubspaceGradients.route`), "check" (no-grad forward: a stop test or a label check)."""


@dataclass
class PassStats(PassObserver):
    """Counts of the model passes of the calls it observed: `gradient_passes` (a forward and its input-gradient
    backward passes: K-1 per DeepFool pass, K-1 or 1 per FMN pass) and `check_passes` (no-grad forwards of stop tests
    and label checks), with the images they ran; `clean_passes`; `routes`: gradient passes by where their backward
    passes stopped; every pass in order (`passes`, what `benchmarks/bench_deepfool.py` replays as the floor).
    `fill` = images per gradient or check pass / batch_size."""

    batch_size: int
    gradient_passes: int = 0
    gradient_rows: int = 0
    check_passes: int = 0
    check_rows: int = 0
    clean_passes: int = 0
    routes: dict[str, int] = field(default_factory=dict)
    passes: list[tuple[str, int]] = field(default_factory=list)  # ("clean" | "gradient" | "check", images) in order

    def model_pass(self, kind: str, images: int, route: str = "input") -> None:
        self.passes.append((kind, images))
        if kind == "clean":
            self.clean_passes += 1
        elif kind == "gradient":
            self.gradient_passes, self.gradient_rows = self.gradient_passes + 1, self.gradient_rows + images
            self.routes[route] = self.routes.get(route, 0) + 1
        elif kind == "check":
            self.check_passes, self.check_rows = self.check_passes + 1, self.check_rows + images
        else:
            raise ValueError(f"unknown pass kind {kind!r}; expected clean, gradient or check")

    @property
    def fill(self) -> float:
        passes = self.gradient_passes + self.check_passes
        return (self.gradient_rows + self.check_rows) / max(passes * self.batch_size, 1)


class MarginEstimator:
    """A margin estimator batched over (sample, subspace) rows.

    Call: `estimator(model, x, subspaces)` with `x: [N, C, H, W]` in the model's input space (pixels in [0, 1],
    normalisation inside the model) returns a `MarginResult` with `[S, N]` fields (subspaces default to the full
    input space); `estimator.attack_rows(model, x, subspaces, sample_index, subspace_index)` measures any list of
    (sample, subspace) rows (a shard of the grid) and returns a `RowResult` with `[R]` fields. `model` is a
    classifier (run on a prepared copy, the caller's model is never changed) or a model prepared once with
    `estimator.prepare(model)` for many calls. `observer` hears of every model pass (`PassObserver`; none by
    default).
    """

    observer: PassObserver = PassObserver()  # an instance attribute replaces it (benchmarks: `PassStats`)
    name: str  # "estimator" in `settings()`
    version: int  # changed whenever the estimator's float results move; result folders record it
    setting_names: tuple[str, ...] = ()  # the attributes that determine the results, in `settings()` order

    def __init__(self, num_candidates: int, batch_size: int, dtype: torch.dtype | None, kernels: str | Collection[str]):
        if batch_size < 1 or num_candidates < 2:
            raise ValueError(f"batch_size must be >= 1 and num_candidates >= 2, got {batch_size}, {num_candidates}")
        if dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32, torch.float64 or None, got {dtype}")
        self.num_candidates = int(num_candidates)
        self.batch_size = int(batch_size)
        self.dtype = dtype
        self.kernels = kernels

    def settings(self) -> dict[str, object]:
        """The settings that determine the results, for result summaries: the estimator's name and version, then
        `setting_names`."""
        return {"estimator": self.name, "version": self.version, **{k: getattr(self, k) for k in self.setting_names}}

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
            task = RowTask(model, x, subspaces, sample_index, subspace_index, return_perturbations, progress)
            with torch.enable_grad(), tf32_off(device):
                return self._attack(task)

    def _attack(self, task: RowTask) -> RowResult:
        """The algorithm on checked rows, gradients on."""
        raise NotImplementedError

    def _candidates(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Top `num_candidates` classes of the clean logits of `x: [N, C, H, W]`, descending (the label first): long
        [N, K]; batches of at most `batch_size` images."""
        chunks = []
        with torch.no_grad():
            for start in range(0, x.shape[0], self.batch_size):
                logits = checked_logits(model, x[start : start + self.batch_size])
                chunks.append(logits.argsort(dim=1, descending=True)[:, : self.num_candidates])
                self.observer.model_pass("clean", logits.shape[0])
        return torch.cat(chunks) if chunks else torch.empty(0, 1, dtype=torch.long, device=x.device)


def empty_result(x: torch.Tensor, rows: int, return_perturbations: bool) -> RowResult:
    """A `RowResult` of `rows` rows to fill in, in the dtype and on the device of `x: [N, C, H, W]`."""
    return RowResult(
        margins=torch.empty(rows, dtype=x.dtype, device=x.device),
        converged=torch.zeros(rows, dtype=torch.bool, device=x.device),
        iterations=torch.zeros(rows, dtype=torch.long, device=x.device),
        labels=torch.zeros(rows, dtype=torch.long, device=x.device),
        perturbed_labels=torch.zeros(rows, dtype=torch.long, device=x.device),
        perturbations=x.new_empty((rows, *x.shape[1:])) if return_perturbations else None,
    )
