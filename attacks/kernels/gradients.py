"""The one thing an estimator asks of a prepared model: the subspace coordinates of the input gradients of scores
of its logits, taken where the model's kernels make them cheapest.

`PreparedModel.subspace_gradients(subspaces)` returns a `SubspaceGradients` for one subspace family. Called on
points `[A, C, H, W]` with a function `scores(logits) -> [A, J]`, it runs one forward pass and J input-gradient
backward passes and returns the scores and, per row (a point and a subspace), the J gradients' coordinates in the
subspace. The backward passes stop at the model's input, or at its first convolution where the stem projection
applies (`stem.py`: one matmul per subspace replaces the stem's backward and the projection); the values are the
same up to float rounding, and the caller never needs to know which.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import nn

from attacks.common import checked_logits
from attacks.kernels.graph import StemSplit
from attacks.kernels.stem import StemProjection
from frequency.subspaces import SubspaceFamily

Scores = Callable[[torch.Tensor], torch.Tensor]
"""`scores(logits [A, num_classes]) -> [A, J]`: the J functions of each point's logits whose gradients are wanted."""


class SubspaceGradients:
    """Subspace coordinates of input gradients of one prepared model along one subspace family (module docstring).

    `subspaces`: the family on the model's device; `route`: where the backward passes stop, "input" or "stem" (for
    observers that count passes); `sorted_rows_pay`: rows along the same subspace cost less when they are
    consecutive, so a caller free to order its rows sorts them by subspace.
    """

    def __init__(
        self, model: nn.Module, subspaces: SubspaceFamily, stem: StemSplit | None, projection: StemProjection | None
    ):
        self.model, self.subspaces, self.stem, self.projection = model, subspaces, stem, projection
        self.route = "input" if projection is None else "stem"
        self.sorted_rows_pay = projection is not None

    def __call__(
        self, points: torch.Tensor, scores: Scores, row_point: torch.Tensor | None, row_subspace: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """At `points: [A, C, H, W]`: the scores `[A, J]` (detached) and, for each row r, the coordinates of the
        input gradients of the J scores of point `row_point[r]` (None: point r) in subspace `row_subspace[r]`,
        `[R, J, *coordinate shape]` (= `subspaces.coordinates` of each gradient)."""
        if self.projection is None:
            target = points.detach().requires_grad_(True)
            values = scores(checked_logits(self.model, target))
        else:
            with torch.no_grad():
                target = self.stem.stem(points)
            values = scores(checked_logits(self.stem.body, target.requires_grad_(True)))
        count = values.shape[1]
        if self.projection is not None:
            sink = self.projection.plan(row_point, row_subspace, count)
            for j, gradient in enumerate(_gradients(values, target)):
                sink.add(j, gradient)  # one stem-sized gradient alive at a time
            return values.detach(), sink.result()
        w = torch.stack(list(_gradients(values, target)), dim=1)  # [A, J, C, H, W]
        rows = w if row_point is None else w[row_point]
        coords = self.subspaces.coordinates(rows.flatten(0, 1), row_subspace.repeat_interleave(count))
        return values.detach(), coords.view(*rows.shape[:2], *coords.shape[1:])


def _gradients(values: torch.Tensor, target: torch.Tensor) -> Iterator[torch.Tensor]:
    """`grad values[:, j].sum()` at `target` for j = 0..J-1, one at a time; `values: [A, J]`."""
    count = values.shape[1]
    for j in range(count):
        (gradient,) = torch.autograd.grad(values[:, j].sum(), target, retain_graph=j < count - 1)
        yield gradient
