"""Batched subspace-constrained DeepFool (REFERENCE §2): the margin of every sample along every subspace.

All (subspace, sample) pairs are processed together as rows of one batch; a row stops being updated as
soon as its label flips, so its result does not depend on its batch-mates. Semantics follow the original
release exactly: fixed top-10 candidates from the clean logits, step `max(pert, 1e-4) * Pw / ||Pw||`
at the current point `x + r`, stop test on `x + (1 + overshoot) r`, result `(1 + overshoot) r`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from frequency.subspaces import FullSpace, SubspaceFamily


@dataclass
class MarginResult:
    """Output of `SubspaceDeepFool`, one entry per (subspace s, sample n).

    margins: [S, N] float, L2 norm of the returned perturbation `(1 + overshoot) r` (input-space units).
    converged: [S, N] bool, True where the label of `x + (1 + overshoot) r` differs from the clean label.
    iterations: [S, N] int64, number of DeepFool steps taken.
    labels: [N] int64, clean predicted labels (the reference class, not the ground truth).
    perturbed_labels: [S, N] int64, predicted labels of `x + (1 + overshoot) r`.
    perturbations: [S, N, C, H, W] or None, the perturbations themselves (only when requested).
    """

    margins: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    labels: torch.Tensor
    perturbed_labels: torch.Tensor
    perturbations: torch.Tensor | None = None


@dataclass
class RowResult:
    """Output of `SubspaceDeepFool.attack_rows`, one entry per requested (sample, subspace) row.

    margins: [R] float, L2 norm of `(1 + overshoot) r`; converged: [R] bool; iterations: [R] int64;
    labels: [R] int64, clean predicted label of the row's sample; perturbed_labels: [R] int64;
    perturbations: [R, C, H, W] or None.
    """

    margins: torch.Tensor
    converged: torch.Tensor
    iterations: torch.Tensor
    labels: torch.Tensor
    perturbed_labels: torch.Tensor
    perturbations: torch.Tensor | None = None


class _EvalMode:
    """Puts every submodule in eval mode and restores each one's own flag on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc) -> None:
        for module, flag in self.flags:
            module.training = flag


class SubspaceDeepFool:
    """Subspace-constrained DeepFool, batched over samples and subspaces.

    Args:
        overshoot: the total perturbation is `(1 + overshoot) r` (release: 0.02).
        max_iter: at most this many steps per (subspace, sample) (release: 100).
        num_candidates: candidate classes, the top ones of the clean logits (release: 10).
        min_step: floor on the step length `pert` (release: 1e-4).
        batch_size: rows (subspace-sample pairs) processed at once; bounds memory to about
            `batch_size * num_candidates * C * H * W` floats for the gradients.

    Call: `attack(model, x, subspaces)` with `x: [N, C, H, W]` in the model's input space (pixels in
    [0, 1], normalisation inside the model) returns a `MarginResult` with `[S, N]` fields;
    `attack.attack_rows(model, x, subspaces, sample_index, subspace_index)` measures any list of
    (sample, subspace) rows (a shard of the grid) and returns a `RowResult` with `[R]` fields.
    The model runs in eval mode during the call; every module's mode is restored afterwards and
    parameter `.grad` fields are never written.
    """

    def __init__(
        self,
        overshoot: float = 0.02,
        max_iter: int = 100,
        num_candidates: int = 10,
        min_step: float = 1e-4,
        batch_size: int = 512,
    ):
        if max_iter < 1 or num_candidates < 2 or batch_size < 1:
            raise ValueError("max_iter and batch_size must be >= 1 and num_candidates >= 2")
        self.overshoot = float(overshoot)
        self.max_iter = int(max_iter)
        self.num_candidates = int(num_candidates)
        self.min_step = float(min_step)
        self.batch_size = int(batch_size)

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

        A row's result depends only on its sample, its subspace and the model, never on the other rows (so any
        split of the rows over processes or chunks gives the same values). Returns a `RowResult` with [R] fields.
        """
        if x.dim() != 4:
            raise ValueError(f"x must be a batch of images [N, C, H, W], got shape {tuple(x.shape)}")
        subspaces.check_image_shape(tuple(x.shape[1:]))
        device = _model_device(model, x.device)
        sample_index = torch.as_tensor(sample_index, dtype=torch.long).flatten().to(device)
        subspace_index = torch.as_tensor(subspace_index, dtype=torch.long).flatten().to(device)
        if sample_index.shape != subspace_index.shape:
            raise ValueError("sample_index and subspace_index must have the same length (one entry per row)")
        if sample_index.numel() and (int(sample_index.min()) < 0 or int(sample_index.max()) >= x.shape[0]):
            raise ValueError(f"sample_index must lie in [0, {x.shape[0]})")
        if subspace_index.numel() and (int(subspace_index.min()) < 0 or int(subspace_index.max()) >= len(subspaces)):
            raise ValueError(f"subspace_index must lie in [0, {len(subspaces)})")
        with torch.inference_mode(False), torch.enable_grad(), _EvalMode(model):
            x = x.detach().to(device).clone()
            if not torch.isfinite(x).all():
                raise ValueError("inputs contain NaN or infinite values; check the data pipeline")
            subspaces = subspaces.to(device)
            return self._run(model, x, subspaces, sample_index, subspace_index, return_perturbations, progress)

    def _run(
        self,
        model: nn.Module,
        x: torch.Tensor,
        subspaces: SubspaceFamily,
        sample_index: torch.Tensor,
        subspace_index: torch.Tensor,
        return_perturbations: bool,
        progress: bool,
    ) -> RowResult:
        with torch.no_grad():
            clean_logits = _logits(model, x) if x.shape[0] else torch.empty(0, 1, device=x.device)
        candidates = clean_logits.argsort(dim=1, descending=True)[:, : self.num_candidates]  # [N, K]

        total = sample_index.numel()
        margins = torch.empty(total, dtype=x.dtype, device=x.device)
        converged = torch.zeros(total, dtype=torch.bool, device=x.device)
        iterations = torch.zeros(total, dtype=torch.long, device=x.device)
        perturbed_labels = torch.empty(total, dtype=torch.long, device=x.device)
        perturbations = (
            torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=x.device) if return_perturbations else None
        )

        bar = _progress_bar(total, progress)
        for start in range(0, total, self.batch_size):
            rows = torch.arange(start, min(start + self.batch_size, total), device=x.device)
            samples, subs = sample_index[rows], subspace_index[rows]
            r_total, conv, iters, plabels = self._attack_rows(model, x[samples], subs, candidates[samples], subspaces)
            margins[rows] = r_total.flatten(1).norm(dim=1)
            converged[rows], iterations[rows], perturbed_labels[rows] = conv, iters, plabels
            if perturbations is not None:
                perturbations[rows] = r_total
            bar.update(len(rows))
        bar.close()
        return RowResult(
            margins=margins,
            converged=converged,
            iterations=iterations,
            labels=candidates[sample_index, 0] if total else torch.empty(0, dtype=torch.long, device=x.device),
            perturbed_labels=perturbed_labels,
            perturbations=perturbations,
        )

    def _attack_rows(
        self,
        model: nn.Module,
        x: torch.Tensor,
        subspace_index: torch.Tensor,
        candidates: torch.Tensor,
        subspaces: SubspaceFamily,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """DeepFool on rows `x: [R, C, H, W]`, row i constrained to subspace `subspace_index[i]`.

        Returns `(1 + overshoot) r: [R, C, H, W]`, converged [R], iterations [R], perturbed labels [R].
        """
        num_rows = x.shape[0]
        labels = candidates[:, 0]
        r = torch.zeros_like(x)
        converged = torch.zeros(num_rows, dtype=torch.bool, device=x.device)
        iterations = torch.zeros(num_rows, dtype=torch.long, device=x.device)
        perturbed_labels = labels.clone()
        active = torch.arange(num_rows, device=x.device)
        scale = 1.0 + self.overshoot

        for _ in range(self.max_iter):
            if active.numel() == 0:
                break
            step, stuck = self._step(
                model, x[active] + r[active], candidates[active], subspace_index[active], subspaces
            )
            r[active] += step
            iterations[active] += 1
            with torch.no_grad():
                new_labels = _logits(model, x[active] + scale * r[active]).argmax(dim=1)
            perturbed_labels[active] = new_labels
            flipped = new_labels != labels[active]
            converged[active] = flipped
            active = active[~(flipped | stuck)]
        return scale * r, converged, iterations, perturbed_labels

    def _step(
        self,
        model: nn.Module,
        point: torch.Tensor,
        candidates: torch.Tensor,
        subspace_index: torch.Tensor,
        subspaces: SubspaceFamily,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DeepFool step from `point: [A, C, H, W]`; returns the step `r_i` and a bool [A] for rows whose
        projected gradients all vanish (they can never move)."""
        point = point.detach().requires_grad_(True)
        logits = _logits(_frozen(model), point)
        f = logits.gather(1, candidates)  # [A, K]
        num_other = f.shape[1] - 1
        grads = []
        for k in range(1, num_other + 1):  # w_k = grad (f_k - f_0); rows are independent in eval mode
            (g,) = torch.autograd.grad((f[:, k] - f[:, 0]).sum(), point, retain_graph=k < num_other)
            grads.append(g)
        w = torch.stack(grads, dim=1)  # [A, K-1, C, H, W]
        gaps = (f[:, 1:] - f[:, :1]).detach()  # [A, K-1]
        num_active = point.shape[0]
        coords = subspaces.coordinates(w.flatten(0, 1), subspace_index.repeat_interleave(num_other))
        coords = coords.view(num_active, num_other, *coords.shape[1:])  # P w_k in subspace coordinates
        norms = coords.flatten(2).norm(dim=2)  # [A, K-1] = ||P w_k||
        pert = gaps.abs() / norms  # inf where the projected gradient vanishes
        best = pert.argmin(dim=1)  # first minimum on ties, like the release's strict '<'
        rows = torch.arange(num_active, device=point.device)
        best_pert, best_norm = pert[rows, best], norms[rows, best]
        stuck = ~torch.isfinite(best_pert)
        length = best_pert.clamp(min=self.min_step).masked_fill(stuck, 0.0)
        scale = (length / best_norm.masked_fill(stuck, 1.0)).view(-1, *([1] * (coords.dim() - 2)))
        step = subspaces.embed(coords[rows, best] * scale, subspace_index)  # max(pert, 1e-4) P w / ||P w||
        return step.detach(), stuck


def _frozen(model: nn.Module):
    """`model` as a function of its input only: parameters enter detached, so backward passes compute input
    gradients without weight gradients (about half the cost) and the module itself is left untouched."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    return lambda x: torch.func.functional_call(model, params, (x,))


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    if logits.dim() != 2:
        raise ValueError(f"model must return logits [N, num_classes], got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("model returned NaN or infinite logits; check the checkpoint and the inputs")
    return logits


def _model_device(model: nn.Module, default: torch.device) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return default


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="DeepFool (subspace, sample) pairs", unit="pair")
