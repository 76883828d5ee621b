"""Batched subspace-constrained DeepFool (REFERENCE §2): the margin of every sample along every subspace.

Every (sample, subspace) pair is a *row*; rows are independent (the model runs in eval mode), so they are
processed in batches and a row's values do not depend on its batch-mates beyond float rounding. Semantics
follow the original release exactly: fixed top-10 candidates from the clean logits, step
`max(pert, 1e-4) * Pw / ||Pw||` at the current point `x + r` (first minimum on ties), stop test on
`x + (1 + overshoot) r`, result `(1 + overshoot) r`.

Speed (each can be switched off for ablation, results equal to float rounding):
- share_first_step: at iteration 0 every row of a sample sits at the clean image, so one forward and
  backward per sample serves all its subspaces (the candidate gradients are projected S ways).
- batched_grads (off by default): the K-1 candidate gradients from one vmapped backward
  (`is_grads_batched`) instead of K-1 backward passes. Measured 1.05-1.3x slower on CPU (PyTorch's vmap
  loops over max-pool backward); not measured on a GPU, where fewer kernel launches may pay.
- refill: a pool of `batch_size` rows; rows that finish are replaced by pending rows at once, so model
  passes stay full instead of a chunk running until its slowest row ends.
- native_stem_grad (CPU) and unroll_small_convs: faster kernels for image-stem convolutions and for
  convolutions over maps no larger than their kernel (`attacks/fast_convs.py`).
- stem_projection (CPU): when the logits depend on the input only through the first convolution, gradients stop
  at its output and one matmul per subspace gives their subspace coordinates (`attacks/stem_projection.py`).
- fold_batchnorm: batch norm folded into the convolution before it, on a copy of the model
  (`attacks/rewrite_graph.py`).
- channels_last_body (CPU): convolutions past the image stem run on channels-last maps (`attacks/rewrite_graph.py`).
- fast_batchnorm, fast_maxpool (CPU): eval-mode batch norm backward as a per-channel multiply and max-pooling in
  channels-last layout or as strided maxima; bit-identical values and gradients (`attacks/fast_functions.py`).

Precision: the attack runs in `dtype` (default: the model's own floating dtype, float32 for models as
built or loaded) with TF32 disabled on CUDA during the call; `precision_record` describes the setting.
"""

from __future__ import annotations

import contextlib
import copy
import platform
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from attacks.fast_convs import fast_convolutions
from attacks.fast_functions import fast_functions
from attacks.rewrite_graph import rewrite_for_attack
from attacks.stem_projection import StemProjection, StemRecorder
from frequency.subspaces import FullSpace, SubspaceFamily

# Bumped whenever a change moves the engine's float results (kernels, batching); result folders record it, and a
# resume refuses chunks written by another version. 2: native stem gradient and unrolled small convolutions.
# 3: stem projection, batch norm folding, channels-last max-pooling. 4: channels-last body on CPU.
ENGINE_VERSION = 4

# Every speed switch set to turn its idea off (results equal up to float rounding): the engine before issue 11, the
# baseline of benchmarks/bench_deepfool.py and of the tests.
IDEAS_OFF = {
    "share_first_step": False,
    "batched_grads": False,
    "refill": False,
    "channels_last": False,
    "native_stem_grad": False,
    "unroll_small_convs": False,
    "stem_projection": False,
    "fold_batchnorm": False,
    "channels_last_body": False,
    "fast_batchnorm": False,
    "fast_maxpool": False,
}


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


@dataclass
class MarginResult(RowResult):
    """Output of `SubspaceDeepFool`, one entry per (subspace s, sample n).

    margins: [S, N] float, L2 norm of the returned perturbation `(1 + overshoot) r` (input-space units).
    converged: [S, N] bool, True where the label of `x + (1 + overshoot) r` differs from the clean label.
    iterations: [S, N] int64, number of DeepFool steps taken.
    labels: [N] int64, clean predicted labels (the reference class, not the ground truth).
    perturbed_labels: [S, N] int64, predicted labels of `x + (1 + overshoot) r`.
    perturbations: [S, N, C, H, W] or None, the perturbations themselves (only when requested).
    """


@dataclass
class _Rows:
    """Rows in flight: output position `index` [A], `sample` [A] (into x), `subspace` [A], accumulated `r`
    [A, C, H, W] and `iterations` [A]."""

    index: torch.Tensor
    sample: torch.Tensor
    subspace: torch.Tensor
    r: torch.Tensor
    iterations: torch.Tensor
    stuck: torch.Tensor | None = None  # bool [A] after a step: every projected gradient vanished

    def __len__(self) -> int:
        return self.index.numel()

    def select(self, keep: torch.Tensor) -> _Rows:
        """The rows where `keep` (bool [A] or int indices) holds."""
        return _Rows(self.index[keep], self.sample[keep], self.subspace[keep], self.r[keep], self.iterations[keep])

    @staticmethod
    def cat(parts: list[_Rows]) -> _Rows:
        parts = [p for p in parts if len(p)] or parts[:1]
        if len(parts) == 1:
            return parts[0]
        fields = ("index", "sample", "subspace", "r", "iterations")
        return _Rows(*(torch.cat([getattr(p, name) for p in parts]) for name in fields))


@dataclass
class PassStats:
    """Counts of the last call's model passes: `gradient_passes` (forward + backward) and `check_passes`
    (no-grad forwards of the stop test), with the images they ran; `fill` = images per pass / batch_size."""

    batch_size: int
    gradient_passes: int = 0
    gradient_rows: int = 0
    check_passes: int = 0
    check_rows: int = 0
    clean_passes: int = 0
    stem_passes: int = 0  # gradient passes that stopped at the stem (stem_projection)

    @property
    def fill(self) -> float:
        passes = self.gradient_passes + self.check_passes
        return (self.gradient_rows + self.check_rows) / max(passes * self.batch_size, 1)


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
        batch_size: rows (subspace-sample pairs) per model pass; bounds memory to about
            `batch_size * num_candidates * C * H * W` floats for the gradients.
        share_first_step: one gradient pass per sample serves iteration 0 of all its subspaces.
        batched_grads: the candidate gradients in one vmapped backward instead of `num_candidates - 1`.
        refill: refill the pool of active rows as rows finish (else a chunk runs until its last row ends).
        dtype: float32 or float64 to run the attack in, None for the model's own floating dtype. When it
            differs from the model's, the attack runs on a cast deep copy (the caller's model is untouched);
            inputs are cast. Results (margins, perturbations) come in this dtype.
        channels_last: run a deep copy of the model in channels-last memory format (convolutions; changes
            float rounding only).
        native_stem_grad: on CPU, convolutions with at most 4 input channels take their input gradient from
            PyTorch's native kernel instead of oneDNN's (changes float rounding only; no effect on CUDA).
        unroll_small_convs: convolutions over an input map no larger than their kernel run as one matmul with
            the exact unrolled matrix (changes float rounding only).
        stem_projection: on CPU, when the logits depend on the input only through the first convolution (after
            the input normalisation), gradients stop at its output and a precomputed matrix per subspace gives
            their coordinates (changes float rounding only; used where it saves work, see
            `attacks/stem_projection.py`).
        fold_batchnorm: run a copy of the model with each batch norm that follows a convolution or linear layer
            folded into it (`attacks/rewrite_graph.py`; changes float rounding only).
        fast_batchnorm: on CPU, eval-mode batch norm backward (of those not folded) as a per-channel multiply
            (same bits).
        channels_last_body: on CPU, a copy of the model whose convolutions reading at least 16 channels have
            channels-last weights, so the body runs channels-last and the stem channels-first
            (`attacks/rewrite_graph.py`; changes float rounding only). `channels_last` puts the whole model there.
        fast_maxpool: on CPU, max-pooling in channels-last layout (16 channels or more) or, without gradient,
            as strided maxima, and `max_pool2d(relu(h))` as `relu(max_pool2d(h))`, in-place ReLUs included (on a
            copy of the model where they run out of place, `attacks/rewrite_graph.py`; same values and gradients).

    Call: `attack(model, x, subspaces)` with `x: [N, C, H, W]` in the model's input space (pixels in
    [0, 1], normalisation inside the model) returns a `MarginResult` with `[S, N]` fields;
    `attack.attack_rows(model, x, subspaces, sample_index, subspace_index)` measures any list of
    (sample, subspace) rows (a shard of the grid) and returns a `RowResult` with `[R]` fields.
    The model runs in eval mode during the call; every module's mode is restored afterwards and
    parameter `.grad` fields are never written. `last_stats` holds the last call's `PassStats`.
    """

    def __init__(
        self,
        overshoot: float = 0.02,
        max_iter: int = 100,
        num_candidates: int = 10,
        min_step: float = 1e-4,
        batch_size: int = 512,
        share_first_step: bool = True,
        batched_grads: bool = False,
        refill: bool = True,
        dtype: torch.dtype | None = None,
        channels_last: bool = False,
        native_stem_grad: bool = True,
        unroll_small_convs: bool = True,
        stem_projection: bool = True,
        fold_batchnorm: bool = True,
        channels_last_body: bool = True,
        fast_batchnorm: bool = True,
        fast_maxpool: bool = True,
    ):
        if max_iter < 1 or num_candidates < 2 or batch_size < 1:
            raise ValueError("max_iter and batch_size must be >= 1 and num_candidates >= 2")
        if dtype not in (None, torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float32, torch.float64 or None, got {dtype}")
        self.overshoot = float(overshoot)
        self.max_iter = int(max_iter)
        self.num_candidates = int(num_candidates)
        self.min_step = float(min_step)
        self.batch_size = int(batch_size)
        self.share_first_step = bool(share_first_step)
        self.batched_grads = bool(batched_grads)
        self.refill = bool(refill)
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.native_stem_grad = bool(native_stem_grad)
        self.unroll_small_convs = bool(unroll_small_convs)
        self.stem_projection = bool(stem_projection)
        self.fold_batchnorm = bool(fold_batchnorm)
        self.channels_last_body = bool(channels_last_body)
        self.fast_batchnorm = bool(fast_batchnorm)
        self.fast_maxpool = bool(fast_maxpool)
        self.last_stats = PassStats(self.batch_size)
        self._stem: _StemState | None = None

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
        device = model_device(model, x.device)
        sample_index = torch.as_tensor(sample_index, dtype=torch.long).flatten().to(device)
        subspace_index = torch.as_tensor(subspace_index, dtype=torch.long).flatten().to(device)
        _check_indices(sample_index, subspace_index, x.shape[0], len(subspaces))
        with torch.inference_mode(False), torch.enable_grad(), _EvalMode(model), _tf32_off(device):
            work_model, dtype = _working_model(model, self.dtype, x.dtype, self.channels_last)
            on_cpu = device.type == "cpu"
            relu_before_pool = self.fast_maxpool and on_cpu and not self.batched_grads
            body = self.channels_last_body and on_cpu
            work_model = rewrite_for_attack(work_model, self.fold_batchnorm, relu_before_pool, body)
            x = x.detach().to(device=device, dtype=dtype, copy=True)
            if not torch.isfinite(x).all():
                raise ValueError("inputs contain NaN or infinite values; check the data pipeline")
            subspaces = subspaces.to(device)
            use_stem = self.stem_projection and device.type == "cpu"
            self._stem = _StemState(work_model, subspaces, tuple(x.shape[1:]), dtype) if use_stem else None
            try:
                with (
                    fast_convolutions(work_model, self.native_stem_grad, self.unroll_small_convs),
                    fast_functions(self.fast_batchnorm, self.fast_maxpool, self.batched_grads),
                ):
                    return self._run(
                        work_model, x, subspaces, sample_index, subspace_index, return_perturbations, progress
                    )
            finally:
                if self._stem is not None:
                    self._stem.close()
                self._stem = None

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
        self.last_stats = PassStats(self.batch_size)
        candidates = self._candidates(model, x)  # [N, K]
        total = sample_index.numel()
        out = RowResult(
            margins=torch.empty(total, dtype=x.dtype, device=x.device),
            converged=torch.zeros(total, dtype=torch.bool, device=x.device),
            iterations=torch.zeros(total, dtype=torch.long, device=x.device),
            labels=candidates[sample_index, 0],
            perturbed_labels=torch.empty(total, dtype=torch.long, device=x.device),
            perturbations=torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=x.device)
            if return_perturbations
            else None,
        )
        bar = _progress_bar(total, progress)
        entering = self._entering(model, x, candidates, subspaces, sample_index, subspace_index, out, bar)
        pending, pool = _Pending(entering), _empty_rows(x)
        while True:
            if self.refill or len(pool) == 0:  # without refill a chunk runs until its last row ends
                pool = _Rows.cat([pool, *pending.take(self.batch_size - len(pool))])
            if len(pool) == 0:
                break
            if self._stem is not None and self._stem.enabled and not _sorted(pool.subspace):
                pool = pool.select(torch.argsort(pool.subspace, stable=True))  # rows of a subspace together
            pool = self._iterate(model, x, candidates, subspaces, pool, out, bar)
        bar.close()
        return out

    def _candidates(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Top `num_candidates` classes of the clean logits, descending: long [N, K]; bounded batches."""
        chunks = []
        with torch.no_grad():
            for start in range(0, x.shape[0], self.batch_size):
                logits = _logits(model, x[start : start + self.batch_size])
                chunks.append(logits.argsort(dim=1, descending=True)[:, : self.num_candidates])
                self.last_stats.clean_passes += 1
        return torch.cat(chunks) if chunks else torch.empty(0, 1, dtype=torch.long, device=x.device)

    def _entering(
        self,
        model: nn.Module,
        x: torch.Tensor,
        candidates: torch.Tensor,
        subspaces: SubspaceFamily,
        sample_index: torch.Tensor,
        subspace_index: torch.Tensor,
        out: RowResult,
        bar,
    ) -> Iterator[_Rows]:
        """Rows ready to join the pool, in chunks of at most `batch_size`, grouped by sample (stable order).

        With `share_first_step` they have taken their first step (one gradient pass per sample) and passed
        its stop test; rows that stop there are written to `out` and never enter the pool.
        """
        order = torch.sort(sample_index, stable=True).indices
        for index in _sample_chunks(order, sample_index[order], self.batch_size):
            rows = _Rows(
                index, sample_index[index], subspace_index[index], _zeros_like_rows(x, index), _zero_long(index)
            )
            if self.share_first_step:
                rows = self._first_step(model, x, candidates, subspaces, rows)
                rows = self._check(model, x, candidates, rows, out, bar)
            if len(rows):
                yield rows

    def _first_step(
        self, model: nn.Module, x: torch.Tensor, candidates: torch.Tensor, subspaces: SubspaceFamily, rows: _Rows
    ) -> _Rows:
        """Iteration 0 of rows sorted by sample: one gradient pass per distinct sample, projected per row."""
        samples, inverse = torch.unique_consecutive(rows.sample, return_inverse=True)
        coords, gaps = self._gradients(model, x[samples], candidates[samples], inverse, rows.subspace, subspaces)
        step, stuck = self._project_step(coords, gaps, rows.subspace, subspaces)
        rows.r, rows.iterations = step, rows.iterations + 1
        rows.stuck = stuck
        return rows

    def _iterate(
        self,
        model: nn.Module,
        x: torch.Tensor,
        candidates: torch.Tensor,
        subspaces: SubspaceFamily,
        pool: _Rows,
        out: RowResult,
        bar,
    ) -> _Rows:
        """One DeepFool step and stop test for every pool row; returns the rows still running."""
        points = x[pool.sample] + pool.r
        coords, gaps = self._gradients(model, points, candidates[pool.sample], None, pool.subspace, subspaces)
        step, stuck = self._project_step(coords, gaps, pool.subspace, subspaces)
        pool.r, pool.iterations = pool.r + step, pool.iterations + 1
        pool.stuck = stuck
        return self._check(model, x, candidates, pool, out, bar)

    def _check(
        self, model: nn.Module, x: torch.Tensor, candidates: torch.Tensor, rows: _Rows, out: RowResult, bar
    ) -> _Rows:
        """Stop test on `x + (1 + overshoot) r`: rows that flipped, cannot move or used `max_iter` steps are
        written to `out`; returns the others."""
        total = (1.0 + self.overshoot) * rows.r
        with torch.no_grad():
            labels = _logits(model, x[rows.sample] + total).argmax(dim=1)
        self.last_stats.check_passes += 1
        self.last_stats.check_rows += len(rows)
        flipped = labels != candidates[rows.sample, 0]
        done = flipped | rows.stuck | (rows.iterations >= self.max_iter)
        index = rows.index[done]
        out.margins[index] = total[done].flatten(1).norm(dim=1)
        out.converged[index] = flipped[done]
        out.iterations[index] = rows.iterations[done]
        out.perturbed_labels[index] = labels[done]
        if out.perturbations is not None:
            out.perturbations[index] = total[done]
        bar.update(int(index.numel()))
        return rows.select(~done)

    def _gradients(
        self,
        model: nn.Module,
        point: torch.Tensor,
        candidates: torch.Tensor,
        row_sample: torch.Tensor | None,
        row_subspace: torch.Tensor,
        subspaces: SubspaceFamily,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """At `point: [A, C, H, W]`, the gradients `w_k = grad (f_k - f_0)` and gaps `f_k - f_0`, [A, K-1], for
        rows r of point `row_sample[r]` (None: point r) along subspace `row_subspace[r]`: the coordinates of
        `P w_k`, [R, K-1, ...], and the gaps [R, K-1]. Gradients are taken at the input or, where the stem
        projection applies, at the first convolution's output (`attacks/stem_projection.py`)."""
        point = point.detach().requires_grad_(True)
        stem = self._stem if self._stem is not None and self._stem.enabled else None
        if stem is not None:
            stem.recorder.start()
        try:
            f = _logits(model, point).gather(1, candidates)  # [A, K]
        finally:
            if stem is not None:
                stem.recorder.stop()
        at_stem = stem.projection(point, f) if stem is not None else None
        self.last_stats.gradient_passes += 1
        self.last_stats.gradient_rows += point.shape[0]
        self.last_stats.stem_passes += at_stem is not None
        num_other = f.shape[1] - 1
        if at_stem is None:
            target, sink, grads = point, None, []
        else:
            target, projection = at_stem
            sink = projection.plan(row_sample, row_subspace, num_other)
        for k, g in enumerate(self._candidate_gradients(f, target)):
            if sink is None:
                grads.append(g)
            else:
                sink.add(k, g)  # one stem-sized gradient alive at a time
        gaps = (f[:, 1:] - f[:, :1]).detach()
        gaps = gaps if row_sample is None else gaps[row_sample]
        if sink is not None:
            return sink.result(), gaps
        w = torch.stack(grads, dim=1)  # [A, K-1, C, H, W]
        rows = w if row_sample is None else w[row_sample]
        coords = subspaces.coordinates(rows.flatten(0, 1), row_subspace.repeat_interleave(num_other))
        return coords.view(*rows.shape[:2], *coords.shape[1:]), gaps  # P w_k in subspace coordinates

    def _candidate_gradients(self, f: torch.Tensor, target: torch.Tensor) -> Iterator[torch.Tensor]:
        """`grad (f_k - f_0)` at `target` for k = 1..K-1, one at a time; `f: [A, K]` logits of the candidates."""
        num_other = f.shape[1] - 1
        if self.batched_grads:
            seeds = torch.eye(num_other + 1, dtype=f.dtype, device=f.device)[1:]
            seeds[:, 0] = -1.0  # seed k: +1 on candidate k, -1 on the reference
            seeds = seeds[:, None, :].expand(num_other, *f.shape)
            (w,) = torch.autograd.grad(f, target, seeds, is_grads_batched=True)
            yield from w.unbind(0)
            return
        for k in range(1, num_other + 1):
            (g,) = torch.autograd.grad((f[:, k] - f[:, 0]).sum(), target, retain_graph=k < num_other)
            yield g

    def _project_step(
        self, coords: torch.Tensor, gaps: torch.Tensor, subspace_index: torch.Tensor, subspaces: SubspaceFamily
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The step `max(pert, min_step) P w_k / ||P w_k||` for the candidate with the smallest
        `pert_k = |g_k| / ||P w_k||`; `coords: [A, K-1, ...]` the subspace coordinates of the `w_k`, `gaps:
        [A, K-1]`. Returns the step [A, C, H, W] and a bool [A] for rows whose projected gradients all vanish
        (they can never move)."""
        num_rows = gaps.shape[0]
        norms = coords.flatten(2).norm(dim=2)  # [A, K-1] = ||P w_k||
        # 0/0 (zero gap, zero projected gradient) would be NaN, which argmin picks; the release's strict '<'
        # never picks it, so it counts as +inf like any other vanishing projected gradient.
        pert = torch.where(norms > 0, gaps.abs() / norms, torch.inf)
        best = pert.argmin(dim=1)  # first minimum on ties, like the release's strict '<'
        rows = torch.arange(num_rows, device=coords.device)
        best_pert, best_norm = pert[rows, best], norms[rows, best]
        stuck = ~torch.isfinite(best_pert)
        length = best_pert.clamp(min=self.min_step).masked_fill(stuck, 0.0)
        scale = (length / best_norm.masked_fill(stuck, 1.0)).view(-1, *([1] * (coords.dim() - 2)))
        step = subspaces.embed(coords[rows, best] * scale, subspace_index)  # max(pert, 1e-4) P w / ||P w||
        return step.detach(), stuck


class _StemState:
    """One call's stem projection: the recorder on the working model and the projection once built. It switches
    itself off for good when the projection would not save work (`StemProjection.worthwhile`)."""

    def __init__(self, model: nn.Module, subspaces: SubspaceFamily, image_shape: tuple[int, ...], dtype: torch.dtype):
        self.recorder = StemRecorder(model)
        self.subspaces, self.image_shape, self.dtype = subspaces, image_shape, dtype
        self.enabled = bool(self.recorder.handles)
        self.built: StemProjection | None = None

    def projection(self, point: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, StemProjection] | None:
        """For the pass just recorded: the stem's output (where gradients stop) and the projection, or None."""
        stem = self.recorder.stem(point, logits)
        if stem is None:
            return None
        if self.built is None or not self.built.matches(stem):
            if not StemProjection.worthwhile(stem, self.subspaces, self.dtype):
                self.enabled = False
                return None
            self.built = StemProjection(stem, self.subspaces, self.image_shape, self.dtype)
        return stem.output, self.built

    def close(self) -> None:
        self.recorder.remove()


def _sorted(values: torch.Tensor) -> bool:
    return bool((values[1:] >= values[:-1]).all())


def _sample_chunks(order: torch.Tensor, samples: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    """Consecutive pieces of `order` (rows sorted by sample, `samples` their sample numbers) of at most `size`
    rows that cut between samples where possible, so each sample's gradient pass is shared by all its rows."""
    counts = torch.unique_consecutive(samples, return_counts=True)[1].tolist()
    start = end = 0
    for count in counts:
        if end > start and end + count - start > size:
            yield from order[start:end].split(size)
            start = end
        end += count
    if end > start:
        yield from order[start:end].split(size)


class _Pending:
    """Rows waiting for the pool, drawn from the chunks of an iterator in order."""

    def __init__(self, chunks: Iterator[_Rows]):
        self.chunks, self.buffer = chunks, None

    def take(self, count: int) -> list[_Rows]:
        """Up to `count` rows (fewer when none are left), as a list of parts."""
        parts = []
        while count > 0:
            if self.buffer is None or len(self.buffer) == 0:
                self.buffer = next(self.chunks, None)
                if self.buffer is None:
                    break
            part = self.buffer.select(slice(0, count))
            self.buffer = self.buffer.select(slice(count, None))
            parts.append(part)
            count -= len(part)
        return parts


def _empty_rows(x: torch.Tensor) -> _Rows:
    index = torch.empty(0, dtype=torch.long, device=x.device)
    return _Rows(index, index, index, _zeros_like_rows(x, index), index)


def _zeros_like_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.new_zeros((index.numel(), *x.shape[1:]))


def _zero_long(index: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(index)


def _check_indices(sample_index: torch.Tensor, subspace_index: torch.Tensor, num_samples: int, count: int) -> None:
    if sample_index.shape != subspace_index.shape:
        raise ValueError("sample_index and subspace_index must have the same length (one entry per row)")
    if sample_index.numel() and (int(sample_index.min()) < 0 or int(sample_index.max()) >= num_samples):
        raise ValueError(f"sample_index must lie in [0, {num_samples})")
    if subspace_index.numel() and (int(subspace_index.min()) < 0 or int(subspace_index.max()) >= count):
        raise ValueError(f"subspace_index must lie in [0, {count})")


def _logits(model, x: torch.Tensor) -> torch.Tensor:
    logits = model(x)
    if logits.dim() != 2 or logits.shape[1] < 2:
        raise ValueError(f"model must return logits [N, num_classes >= 2], got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("model returned NaN or infinite logits; check the checkpoint and the inputs")
    return logits


def model_device(model: nn.Module, default: torch.device | str = "cpu") -> torch.device:
    """Device of the model's first parameter (else buffer), or `default` for a model without tensors."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device(default)


def _working_model(
    model: nn.Module, dtype: torch.dtype | None, input_dtype: torch.dtype, channels_last: bool
) -> tuple[nn.Module, torch.dtype]:
    """`(model, dtype)` to run the attack with. The model itself when its floating tensors already have `dtype`
    (None: the model's own) and `channels_last` is off; else a deep copy, cast and/or in channels-last memory
    format (the caller's model is never changed)."""
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if dtype is None:
        dtype = floats[0].dtype if floats else (input_dtype if input_dtype.is_floating_point else torch.float32)
    if all(t.dtype == dtype for t in floats) and not channels_last:
        return model, dtype
    work = copy.deepcopy(model).to(dtype)
    return (_ChannelsLast(work.to(memory_format=torch.channels_last)) if channels_last else work), dtype


class _ChannelsLast(nn.Module):
    """Runs `model` on its input in channels-last memory format (faster convolutions on some CPUs)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.training = model.training  # an eval-mode model stays one (batch norms can then be folded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.contiguous(memory_format=torch.channels_last))


@contextlib.contextmanager
def _tf32_off(device: torch.device):
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
