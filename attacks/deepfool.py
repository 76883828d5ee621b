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
the prepared working copy (`kernels="auto"`: CPU kernels on the CPU, the model as written elsewhere) and asks it for
the subspace coordinates of its candidate gradients (`PreparedModel.subspace_gradients`), never naming a kernel.
Model passes are reported to the estimator's `observer` (`attacks.estimator.PassObserver`, silent by default).

Precision: the attack runs in `dtype` (default: the model's own floating dtype, float32 for models as built or
loaded) with TF32 disabled on CUDA during the call; `attacks.common.precision_record` describes the setting.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from dataclasses import dataclass

import torch

from attacks.common import RowResult, checked_logits, progress_bar
from attacks.estimator import MarginEstimator, RowTask, empty_result

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
    many calls. `observer` hears of every model pass (`attacks.estimator.PassStats` counts them).
    """

    share_first_step = True  # ablation switches of the two algorithmic ideas (module docstring)
    refill = True
    name, version = "deepfool", ENGINE_VERSION
    setting_names = ("overshoot", "max_iter", "num_candidates", "min_step")

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
        super().__init__(num_candidates, batch_size, dtype, kernels)
        self.overshoot = float(overshoot)
        self.max_iter = int(max_iter)
        self.min_step = float(min_step)

    def _attack(self, task: RowTask) -> RowResult:
        return _Run(self, task).rows()


class _Run:
    """One call of the engine: the checked rows, the prepared model's subspace gradients, the steps of the
    algorithm."""

    def __init__(self, attack: SubspaceDeepFool, task: RowTask):
        self.attack, self.task, self.model, self.x = attack, task, task.model, task.x
        self.gradients = task.model.subspace_gradients(task.subspaces)
        self.subspaces, self.observer = self.gradients.subspaces, attack.observer

    def rows(self) -> RowResult:
        attack, x, task = self.attack, self.x, self.task
        self.candidates = attack._candidates(self.model, x)  # [N, K]
        total = task.sample_index.numel()
        out = empty_result(x, total, task.return_perturbations)
        out.labels = self.candidates[task.sample_index, 0]
        bar = progress_bar(total, task.progress, "DeepFool (sample, subspace) rows")
        entering = self._entering(task.sample_index, task.subspace_index, out, bar)
        pending, pool = _Pending(entering), _empty_rows(x)
        while True:
            if attack.refill or len(pool) == 0:  # without refill a batch runs until its last row ends
                pool = _Rows.cat([pool, *pending.take(attack.batch_size - len(pool))])
            if len(pool) == 0:
                break
            if self.gradients.sorted_rows_pay and not _sorted(pool.subspace):
                pool = pool.select(torch.argsort(pool.subspace, stable=True))  # rows of a subspace together
            pool = self._iterate(pool, out, bar)
        bar.close()
        return out

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
        self.observer.model_pass("check", len(rows))
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
        `P w_k`, [R, K-1, ...], and the gaps [R, K-1] (`PreparedModel.subspace_gradients`)."""

        def gaps_of(logits: torch.Tensor) -> torch.Tensor:
            f = logits.gather(1, candidates)  # [A, K]
            return f[:, 1:] - f[:, :1]

        gaps, coords = self.gradients(point, gaps_of, row_sample, row_subspace)
        self.observer.model_pass("gradient", point.shape[0], self.gradients.route)
        return coords, (gaps if row_sample is None else gaps[row_sample])

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
