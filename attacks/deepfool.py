"""Batched subspace-constrained DeepFool: the margin of every sample along every subspace.

Semantics follow the original release exactly: fixed top-10 candidates from the clean logits, step
`max(pert, 1e-4) * Pw / ||Pw||` at the current point `x + r` (first minimum on ties), stop test on
`x + (1 + overshoot) r`, result `(1 + overshoot) r`, at most 100 steps; a row whose label never changes is
flagged as not converged.

Every (sample, subspace) pair is a *row*; rows are independent (the model runs in eval mode), so they are processed
in batches and a row's values do not depend on its batch-mates beyond float rounding. Two ideas pay on every device
(docs/ENGINE.md):
- the shared first step: at iteration 0 every row of a sample sits at the clean image, so one forward and backward
  per sample serves all its subspaces (the candidate gradients are projected S ways);
- the refilled pool: `batch_size` rows run together; rows that finish are replaced by pending rows at once, so
  model passes stay full instead of a batch running until its slowest row ends.
Both are class attributes (`share_first_step`, `refill`) an ablation may switch off on an instance.

Everything device-specific sits behind `attacks.kernels.prepare_model`, called once per evaluation: the engine runs
the prepared working copy (`kernels="auto"`: CPU kernels on the CPU, the model as written elsewhere).

Precision: the attack runs in `dtype` (default: the model's own floating dtype, float32 for models as built or
loaded) with TF32 disabled on CUDA during the call; `attacks.common.precision_record` describes the setting.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass, field

import torch

from attacks.common import (
    RowResult,
    checked_logits,
    progress_bar,
)
from attacks.estimator import MarginEstimator
from attacks.kernels import PreparedModel
from attacks.kernels.stem import StemProjection
from frequency.subspaces import SubspaceFamily

# Bumped whenever a change moves the engine's float results (kernels, batching); result folders record it, and a
# resume refuses chunks written by another version.
ENGINE_VERSION = 5


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
    """Counts of the last call's model passes: `gradient_passes` (forward + K-1 input-gradient backward passes) and
    `check_passes` (no-grad forwards of the stop test), with the images they ran, and every pass in order
    (`passes`, what `benchmarks/bench_deepfool.py` replays as the floor); `fill` = images per pass / batch_size."""

    batch_size: int
    gradient_passes: int = 0
    gradient_rows: int = 0
    check_passes: int = 0
    check_rows: int = 0
    clean_passes: int = 0
    stem_passes: int = 0  # gradient passes that stopped at the stem (stem_projection)
    passes: list[tuple[str, int]] = field(default_factory=list)  # ("clean" | "gradient" | "check", images) in order

    @property
    def fill(self) -> float:
        passes = self.gradient_passes + self.check_passes
        return (self.gradient_rows + self.check_rows) / max(passes * self.batch_size, 1)


class SubspaceDeepFool(MarginEstimator):
    """Subspace-constrained DeepFool, batched over samples and subspaces.

    Args:
        overshoot: the total perturbation is `(1 + overshoot) r` (release: 0.02).
        max_iter: at most this many steps per (subspace, sample) (release: 100).
        num_candidates: candidate classes, the top ones of the clean logits (release: 10).
        min_step: floor on the step length `pert` (release: 1e-4).
        batch_size: rows (subspace-sample pairs) per model pass; bounds memory to about
            `batch_size * num_candidates * C * H * W` floats for the gradients.
        dtype: float32 or float64 to run the attack in, None for the model's own floating dtype. Inputs are cast;
            results (margins, perturbations) come in this dtype.
        kernels: "auto" (the device's kernels, `attacks.kernels`: CPU kernels on the CPU, none elsewhere) or "off"
            (the model as written everywhere); kernels change float rounding only.

    Call: `attack(model, x, subspaces)` with `x: [N, C, H, W]` in the model's input space (pixels in [0, 1],
    normalisation inside the model) returns a `MarginResult` with `[S, N]` fields;
    `attack.attack_rows(model, x, subspaces, sample_index, subspace_index)` measures any list of (sample, subspace)
    rows (a shard of the grid) and returns a `RowResult` with `[R]` fields. `model` is a classifier (run on a
    prepared copy, the caller's model is never changed) or a model prepared once with `attack.prepare(model)` for
    many calls. `last_stats` holds the last call's `PassStats`.
    """

    share_first_step = True  # ablation switches of the two algorithmic ideas (module docstring)
    refill = True

    def __init__(
        self,
        overshoot: float = 0.02,
        max_iter: int = 100,
        num_candidates: int = 10,
        min_step: float = 1e-4,
        batch_size: int = 512,
        dtype: torch.dtype | None = None,
        kernels: str | Collection[str] = "auto",
    ):
        if max_iter < 1 or num_candidates < 2 or batch_size < 1:
            raise ValueError("max_iter and batch_size must be >= 1 and num_candidates >= 2")
        super().__init__(batch_size, dtype, kernels)
        self.overshoot = float(overshoot)
        self.max_iter = int(max_iter)
        self.num_candidates = int(num_candidates)
        self.min_step = float(min_step)
        self.last_stats = PassStats(self.batch_size)

    def settings(self) -> dict[str, object]:
        """The settings that determine the results, for result summaries."""
        return {
            "estimator": "deepfool",
            "version": ENGINE_VERSION,
            "overshoot": self.overshoot,
            "max_iter": self.max_iter,
            "num_candidates": self.num_candidates,
            "min_step": self.min_step,
        }

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
        projection = model.stem_projection(subspaces, tuple(x.shape[1:]))
        run = _Run(self, model, x, subspaces.to(model.device), projection)
        return run.rows(sample_index, subspace_index, return_perturbations, progress)


class _Run:
    """One call of the engine: the prepared model, the inputs and the subspaces, and the steps of the algorithm."""

    def __init__(
        self,
        attack: SubspaceDeepFool,
        model: PreparedModel,
        x: torch.Tensor,
        subspaces: SubspaceFamily,
        projection: StemProjection | None,
    ):
        self.attack, self.model, self.x, self.subspaces, self.projection = attack, model, x, subspaces, projection
        self.stats = attack.last_stats = PassStats(attack.batch_size)

    def rows(
        self, sample_index: torch.Tensor, subspace_index: torch.Tensor, return_perturbations: bool, progress: bool
    ) -> RowResult:
        attack, x = self.attack, self.x
        self.candidates = self._candidates()  # [N, K]
        total = sample_index.numel()
        out = RowResult(
            margins=torch.empty(total, dtype=x.dtype, device=x.device),
            converged=torch.zeros(total, dtype=torch.bool, device=x.device),
            iterations=torch.zeros(total, dtype=torch.long, device=x.device),
            labels=self.candidates[sample_index, 0],
            perturbed_labels=torch.empty(total, dtype=torch.long, device=x.device),
            perturbations=torch.empty((total, *x.shape[1:]), dtype=x.dtype, device=x.device)
            if return_perturbations
            else None,
        )
        bar = progress_bar(total, progress, "DeepFool (sample, subspace) rows")
        pending, pool = _Pending(self._entering(sample_index, subspace_index, out, bar)), _empty_rows(x)
        while True:
            if attack.refill or len(pool) == 0:  # without refill a batch runs until its last row ends
                pool = _Rows.cat([pool, *pending.take(attack.batch_size - len(pool))])
            if len(pool) == 0:
                break
            if self.projection is not None and not _sorted(pool.subspace):
                pool = pool.select(torch.argsort(pool.subspace, stable=True))  # rows of a subspace together
            pool = self._iterate(pool, out, bar)
        bar.close()
        return out

    def _candidates(self) -> torch.Tensor:
        """Top `num_candidates` classes of the clean logits, descending: long [N, K]; bounded batches."""
        x, size, chunks = self.x, self.attack.batch_size, []
        with torch.no_grad():
            for start in range(0, x.shape[0], size):
                logits = checked_logits(self.model, x[start : start + size])
                chunks.append(logits.argsort(dim=1, descending=True)[:, : self.attack.num_candidates])
                self.stats.clean_passes += 1
                self.stats.passes.append(("clean", logits.shape[0]))
        return torch.cat(chunks) if chunks else torch.empty(0, 1, dtype=torch.long, device=x.device)

    def _entering(
        self, sample_index: torch.Tensor, subspace_index: torch.Tensor, out: RowResult, bar
    ) -> Iterator[_Rows]:
        """Rows ready to join the pool, in chunks of at most `batch_size`, grouped by sample (stable order).

        With `share_first_step` they have taken their first step (one gradient pass per sample) and passed
        its stop test; rows that stop there are written to `out` and never enter the pool.
        """
        order = torch.sort(sample_index, stable=True).indices
        for index in _sample_chunks(order, sample_index[order], self.attack.batch_size):
            rows = _Rows(
                index, sample_index[index], subspace_index[index], _zeros_like_rows(self.x, index), _zero_long(index)
            )
            if self.attack.share_first_step:
                rows = self._first_step(rows)
                rows = self._check(rows, out, bar)
            if len(rows):
                yield rows

    def _first_step(self, rows: _Rows) -> _Rows:
        """Iteration 0 of rows sorted by sample: one gradient pass per distinct sample, projected per row."""
        samples, inverse = torch.unique_consecutive(rows.sample, return_inverse=True)
        coords, gaps = self._gradients(self.x[samples], self.candidates[samples], inverse, rows.subspace)
        step, stuck = self._project_step(coords, gaps, rows.subspace)
        rows.r, rows.iterations = step, rows.iterations + 1
        rows.stuck = stuck
        return rows

    def _iterate(self, pool: _Rows, out: RowResult, bar) -> _Rows:
        """One DeepFool step and stop test for every pool row; returns the rows still running."""
        points = self.x[pool.sample] + pool.r
        coords, gaps = self._gradients(points, self.candidates[pool.sample], None, pool.subspace)
        step, stuck = self._project_step(coords, gaps, pool.subspace)
        pool.r, pool.iterations = pool.r + step, pool.iterations + 1
        pool.stuck = stuck
        return self._check(pool, out, bar)

    def _check(self, rows: _Rows, out: RowResult, bar) -> _Rows:
        """Stop test on `x + (1 + overshoot) r`: rows that flipped, cannot move or used `max_iter` steps are
        written to `out`; returns the others."""
        attack, x = self.attack, self.x
        total = (1.0 + attack.overshoot) * rows.r
        with torch.no_grad():
            labels = checked_logits(self.model, x[rows.sample] + total).argmax(dim=1)
        self.stats.check_passes += 1
        self.stats.check_rows += len(rows)
        self.stats.passes.append(("check", len(rows)))
        flipped = labels != self.candidates[rows.sample, 0]
        done = flipped | rows.stuck | (rows.iterations >= attack.max_iter)
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
        self, point: torch.Tensor, candidates: torch.Tensor, row_sample: torch.Tensor | None, row_subspace: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """At `point: [A, C, H, W]`, the gradients `w_k = grad (f_k - f_0)` and gaps `f_k - f_0`, [A, K-1], for
        rows r of point `row_sample[r]` (None: point r) along subspace `row_subspace[r]`: the coordinates of
        `P w_k`, [R, K-1, ...], and the gaps [R, K-1]. Gradients are taken at the input or, with the stem
        projection, at the first convolution's output (`attacks/kernels/stem.py`)."""
        if self.projection is None:
            target = point.detach().requires_grad_(True)
            f = checked_logits(self.model, target).gather(1, candidates)  # [A, K]
        else:
            with torch.no_grad():
                target = self.model.stem.stem(point)
            f = checked_logits(self.model.stem.body, target.requires_grad_(True)).gather(1, candidates)
        self.stats.gradient_passes += 1
        self.stats.gradient_rows += point.shape[0]
        self.stats.passes.append(("gradient", point.shape[0]))
        self.stats.stem_passes += self.projection is not None
        num_other = f.shape[1] - 1
        gaps = (f[:, 1:] - f[:, :1]).detach()
        gaps = gaps if row_sample is None else gaps[row_sample]
        if self.projection is not None:
            sink = self.projection.plan(row_sample, row_subspace, num_other)
            for k, g in enumerate(_candidate_gradients(f, target)):
                sink.add(k, g)  # one stem-sized gradient alive at a time
            return sink.result(), gaps
        w = torch.stack(list(_candidate_gradients(f, target)), dim=1)  # [A, K-1, C, H, W]
        rows = w if row_sample is None else w[row_sample]
        coords = self.subspaces.coordinates(rows.flatten(0, 1), row_subspace.repeat_interleave(num_other))
        return coords.view(*rows.shape[:2], *coords.shape[1:]), gaps  # P w_k in subspace coordinates

    def _project_step(
        self, coords: torch.Tensor, gaps: torch.Tensor, subspace_index: torch.Tensor
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
        length = best_pert.clamp(min=self.attack.min_step).masked_fill(stuck, 0.0)
        scale = (length / best_norm.masked_fill(stuck, 1.0)).view(-1, *([1] * (coords.dim() - 2)))
        step = self.subspaces.embed(coords[rows, best] * scale, subspace_index)  # max(pert, 1e-4) P w / ||P w||
        return step.detach(), stuck


def _candidate_gradients(f: torch.Tensor, target: torch.Tensor) -> Iterator[torch.Tensor]:
    """`grad (f_k - f_0)` at `target` for k = 1..K-1, one at a time; `f: [A, K]` logits of the candidates."""
    num_other = f.shape[1] - 1
    for k in range(1, num_other + 1):
        (g,) = torch.autograd.grad((f[:, k] - f[:, 0]).sum(), target, retain_graph=k < num_other)
        yield g


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
