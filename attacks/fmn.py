"""Fast Minimum-Norm attack (FMN, L2) constrained to a subspace, batched over (sample, subspace) rows.

A second margin estimator next to DeepFool: the smallest L2 perturbation inside a subspace S that changes the
model's clean prediction, found by FMN (Pintor, Roli, Brendel, Biggio, "Fast Minimum-norm Adversarial Attacks
through Adaptive Norm Constraints", NeurIPS 2021). Chosen over DDN (Rony et al., CVPR 2019) because FMN sets its
norm budget from the linear estimate of the boundary distance until the first adversarial point, so it needs
no initial norm (DDN's starting norm and step size have to fit the margin's scale, which here spans an order of
magnitude across subspaces), and because foolbox ships an L2 FMN to compare against in the full space
(benchmarks/bench_fmn.py; foolbox 3.3.4's L2 projection onto the budget is a no-op, so the benchmark also runs it
with the paper's projection).

Per row (sample x, its clean predicted label l, subspace S), with the perturbation kept as subspace coordinates
c (`r = embed(c)`, so r never leaves S; the full space is `FullSpace`) and the loss `L = f_l - f_j` at x + r
against a competitor class j, step i = 0..steps-1 is:
1. at x + r: L, the coordinates of its gradient `g = coordinates(grad L)` (= `P grad L`) and the label; the
   smallest adversarial iterate so far is kept;
2. the norm budget: `eps <- min(eps (1 - gamma_i), best norm)` if x + r is adversarial, else `eps (1 + gamma_i)`
   once an adversarial point was found, else `(||c|| + |L| / ||g||) (1 + gamma_i)`;
3. `c <- c - alpha_i eps g / ||g||`, then `c <- c min(1, eps / ||c||)` (projection onto the eps-ball in S).
`alpha_i` and `gamma_i` decay from `step_ratio` to `step_ratio / 100` and from `gamma` to 0.001 on the paper's
cosine schedule. The iterate after the last step is checked too. No pixel box (margins are unconstrained, like
DeepFool's here); the start is x itself.

Three departures from the paper, each for margins along subspaces:
- Step 0's competitor is the class whose linearised boundary is nearest along S among the top `num_candidates`
  classes of the clean logits (DeepFool's choice; one gradient pass per sample, shared by its subspaces); later
  steps use the paper's highest-scoring other class. Along a subspace the top competitor is often not the
  nearest one, and FMN, which follows a single class, does not leave the first boundary it settles on.
- The step is relative to the budget (`alpha_i eps`) instead of an absolute length tuned for images in [0, 1]:
  margins along different subspaces differ by an order of magnitude, and a relative step makes the attack
  scale-free. Step 0 with `step_ratio = 1` lands on the (overshot) linearised boundary: one DeepFool step.
- The linear estimate is overshot by `1 + gamma_i`, so an iterate on a flat boundary crosses it instead of
  staying on it (exactly on a boundary the label has not changed).
Last, a bisection refines the smallest adversarial iterate along its own ray: `t c` for t in (0, 1], with
`search_steps` label checks, returning the smallest adversarial `t c` found (still in S, still adversarial).
On a linear model this gives the exact margin to about `2^-search_steps` relative.

Cost per row: `steps - 1` forward + backward passes, one forward and `num_candidates - 1` backward passes per
sample and chunk for step 0, and `search_steps + 2` forward passes. A row that is never adversarial is flagged
`converged=False`; its margin field holds the norm of the final iterate, which is not a margin.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from attacks.common import RowResult, checked_logits, progress_bar
from attacks.estimator import MarginEstimator, RowTask, empty_result
from frequency.subspaces import SubspaceFamily

# Changed whenever a change moves FMN's float results; result folders record it and a resume refuses other versions.
FMN_VERSION = 1
FINAL_GAMMA = 0.001  # the paper's final budget change rate
STEP_DECAY = 100.0  # the final relative step is step_ratio / STEP_DECAY (the paper's alpha_final = alpha_0 / 100)


@dataclass
class _Chunk:
    """Rows attacked together: `sample` [A] (into x), clean top classes `candidates` [A, K] (label first),
    `subspace` [A], and the clean images `x0` [A, C, H, W]."""

    sample: torch.Tensor
    candidates: torch.Tensor
    subspace: torch.Tensor
    x0: torch.Tensor

    @property
    def labels(self) -> torch.Tensor:
        return self.candidates[:, 0]


@dataclass
class _Search:
    """FMN state of a chunk: iterate `c` and best adversarial iterate `best` (subspace coordinates [A, ...]),
    `best_norm` [A] (inf until one is found), `best_step` [A] (number of steps that reached `best`), budget
    `eps` [A]."""

    c: torch.Tensor
    best: torch.Tensor
    best_norm: torch.Tensor
    best_step: torch.Tensor
    eps: torch.Tensor

    @property
    def found(self) -> torch.Tensor:
        return torch.isfinite(self.best_norm)

    def record(self, adversarial: torch.Tensor, step: int) -> torch.Tensor:
        """Keep the iterate where it is adversarial and smaller than the best; returns its norms [A]."""
        norm = _norms(self.c)
        better = adversarial & (norm < self.best_norm)
        self.best_norm = torch.where(better, norm, self.best_norm)
        self.best = torch.where(_expand(better, self.c), self.c, self.best)
        self.best_step = torch.where(better, step, self.best_step)
        return norm


class SubspaceFMN(MarginEstimator):
    """Subspace-constrained L2 FMN, batched over samples and subspaces; same interface as `SubspaceDeepFool`.

    Args:
        steps: FMN steps per row (gradient evaluations), fixed whatever the row. Default 200: on a LeNet trained
            briefly on MNIST (30 samples x 21 DCT 8x8 blocks), the median margin with 100 / 200 / 1000 steps was
            3.482 / 3.471 / 3.446 (200 within 0.7% of 1000); in the full space 100 steps already match 1000.
        gamma: initial relative change of the norm budget per step (cosine-annealed to 0.001); paper: 0.05.
        step_ratio: initial step length as a fraction of the norm budget (cosine-annealed to step_ratio / 100).
        search_steps: bisection steps along the best adversarial iterate's ray (relative precision about
            `2^-search_steps`); 0 returns the best iterate itself.
        num_candidates: classes (the top ones of the clean logits, label included) among which step 0 picks the
            competitor with the nearest linearised boundary along the subspace; 2 gives the paper's top one.
        batch_size: rows (subspace-sample pairs) attacked together; memory is a few `batch_size * C * H * W`
            floats, the model's activations for `batch_size` images and, in step 0, `num_candidates - 1`
            gradients of at most `batch_size` images.
        dtype: float32 or float64 to run the attack in, None for the model's own floating dtype. Inputs are cast;
            results come in this dtype.
        kernels: "auto" (the device's kernels, `attacks.kernels`: CPU kernels on the CPU, none elsewhere) or "off".

    Call: `attack(model, x, subspaces)` with `x: [N, C, H, W]` in the model's input space (pixels in [0, 1],
    normalisation inside the model) returns a `MarginResult` with `[S, N]` fields; `attack.attack_rows(model, x,
    subspaces, sample_index, subspace_index)` attacks any list of rows and returns a `RowResult` with `[R]`
    fields. Fields: `margins` the L2 norm of the returned perturbation (input-space units; for a row that is not
    converged, the norm of its final iterate, not a margin); `converged` True where the label of x + r differs
    from the clean label; `iterations` the number of FMN steps that reached the iterate refined into the result
    (1..steps; `steps` for rows not converged); `labels` the clean predicted labels (the reference class, not
    the ground truth); `perturbed_labels` the labels of x + r; `perturbations` r, when requested.
    `model` is a classifier (run on a prepared copy: `attacks.kernels.prepare_model`, the caller's model is never
    changed) or a model prepared once with `attack.prepare(model)`; TF32 is off on CUDA during the call. Each
    row's result depends only on its sample, its subspace and the model (batch-mates change float rounding only),
    and the same call gives the same bits.
    """

    name, version = "fmn", FMN_VERSION
    setting_names = ("steps", "gamma", "step_ratio", "search_steps", "num_candidates")

    def __init__(
        self,
        steps: int = 200,
        gamma: float = 0.05,
        step_ratio: float = 1.0,
        search_steps: int = 30,
        num_candidates: int = 10,
        batch_size: int = 512,
        dtype: torch.dtype | None = None,
        kernels: str = "auto",
    ):
        if steps < 1 or batch_size < 1 or search_steps < 0 or num_candidates < 2:
            raise ValueError(
                "steps and batch_size must be >= 1, search_steps >= 0 and num_candidates >= 2, got "
                f"steps={steps}, batch_size={batch_size}, search_steps={search_steps}, num_candidates={num_candidates}"
            )
        if not 0.0 < gamma < 1.0 or not step_ratio > 0.0:
            raise ValueError(
                f"gamma must lie in (0, 1) and step_ratio be > 0, got gamma={gamma}, step_ratio={step_ratio}"
            )
        super().__init__(num_candidates, batch_size, dtype, kernels)
        self.steps = int(steps)
        self.gamma = float(gamma)
        self.step_ratio = float(step_ratio)
        self.search_steps = int(search_steps)

    def _attack(self, task: RowTask) -> RowResult:
        model, x, sample_index = task.model, task.x, task.sample_index
        subspaces = task.subspaces.to(model.device)
        candidates = self._candidates(model, x)
        out = empty_result(x, sample_index.numel(), task.return_perturbations)
        order = torch.sort(sample_index, stable=True).indices  # a chunk's rows share few samples
        bar = progress_bar(order.numel(), task.progress, "FMN (sample, subspace) rows")
        for index in order.split(self.batch_size):
            samples = sample_index[index]
            chunk = _Chunk(samples, candidates[samples], task.subspace_index[index], x[samples])
            part = self._attack_chunk(model, x, chunk, subspaces, task.return_perturbations)
            for name in ("margins", "converged", "iterations", "labels", "perturbed_labels", "perturbations"):
                if getattr(out, name) is not None:
                    getattr(out, name)[index] = getattr(part, name)
            bar.update(index.numel())
        bar.close()
        return out

    def _attack_chunk(
        self, model: nn.Module, x: torch.Tensor, chunk: _Chunk, subspaces: SubspaceFamily, return_perturbations: bool
    ) -> RowResult:
        """FMN on one chunk of rows, the bisection along the best ray and the final label check."""
        state = self._fmn(model, x, chunk, subspaces)
        found = state.found
        coords = torch.where(_expand(found, state.c), self._bisect(model, chunk, subspaces, state), state.c)
        r = subspaces.embed(coords, chunk.subspace).detach()
        with torch.no_grad():
            perturbed = checked_logits(model, chunk.x0 + r).argmax(dim=1)
        self.observer.model_pass("check", r.shape[0])
        return RowResult(
            margins=_norms(coords),
            converged=perturbed != chunk.labels,
            iterations=torch.where(found, state.best_step, self.steps),
            labels=chunk.labels,
            perturbed_labels=perturbed,
            perturbations=r if return_perturbations else None,
        )

    def _fmn(self, model: nn.Module, x: torch.Tensor, chunk: _Chunk, subspaces: SubspaceFamily) -> _Search:
        """`steps` FMN steps from the clean images (step 0 against the nearest candidate), then a label check of
        the last iterate."""
        zeros = subspaces.coordinates(torch.zeros_like(chunk.x0), chunk.subspace)
        infinite = torch.full((zeros.shape[0],), torch.inf, dtype=zeros.dtype, device=zeros.device)
        state = _Search(zeros, zeros.clone(), infinite, torch.zeros_like(chunk.sample), infinite.clone())
        for i in range(self.steps):
            cosine = (1.0 + math.cos(math.pi * i / self.steps)) / 2.0
            gamma = FINAL_GAMMA + (self.gamma - FINAL_GAMMA) * cosine
            ratio = self.step_ratio * (1.0 / STEP_DECAY + (1.0 - 1.0 / STEP_DECAY) * cosine)
            if i == 0:  # at the clean image: never adversarial
                loss, grad = self._nearest_candidate(model, x, chunk, subspaces)
                adversarial = torch.zeros_like(chunk.labels, dtype=torch.bool)
            else:
                loss, adversarial, grad = self._loss_and_gradient(model, chunk, subspaces, state.c)
            norm = state.record(adversarial, i)
            self._update_budget(state, adversarial, norm, loss, _norms(grad), gamma)
            self._step(state, grad, ratio)
        with torch.no_grad():
            point = chunk.x0 + subspaces.embed(state.c, chunk.subspace)
            state.record(checked_logits(model, point).argmax(dim=1) != chunk.labels, self.steps)
        self.observer.model_pass("check", point.shape[0])
        return state

    def _nearest_candidate(
        self, model: nn.Module, x: torch.Tensor, chunk: _Chunk, subspaces: SubspaceFamily
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """At the clean images: the loss `f_l - f_k` [A] and the coordinates of `P grad (f_l - f_k)` for the
        candidate k with the smallest linear distance `|f_l - f_k| / ||P grad (f_l - f_k)||` along each row's
        subspace (first minimum on ties). One gradient pass per distinct sample of the chunk."""
        samples, inverse = torch.unique(chunk.sample, return_inverse=True)
        candidates = chunk.candidates.new_empty(samples.numel(), chunk.candidates.shape[1])
        candidates[inverse] = chunk.candidates
        point = x[samples].detach().requires_grad_(True)
        f = checked_logits(model, point).gather(1, candidates)  # [U, K]
        self.observer.model_pass("gradient", point.shape[0])
        best_pert = torch.full_like(chunk.x0[:, 0, 0, 0], torch.inf)
        best_loss = torch.zeros_like(best_pert)
        best_grad = subspaces.coordinates(torch.zeros_like(chunk.x0), chunk.subspace)
        for k in range(1, f.shape[1]):
            gap = f[:, 0] - f[:, k]
            (g,) = torch.autograd.grad(gap.sum(), point, retain_graph=k < f.shape[1] - 1)
            grad = _projected(g[inverse], chunk.subspace, subspaces)
            grad_norm, loss = _norms(grad), gap.detach()[inverse]
            pert = torch.where(grad_norm > 0, loss.abs() / torch.where(grad_norm > 0, grad_norm, 1.0), torch.inf)
            better = pert < best_pert  # first minimum on ties
            best_pert = torch.where(better, pert, best_pert)
            best_loss = torch.where(better, loss, best_loss)
            best_grad = torch.where(_expand(better, grad), grad, best_grad)
        return best_loss, best_grad

    def _loss_and_gradient(
        self, model: nn.Module, chunk: _Chunk, subspaces: SubspaceFamily, c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """At `x0 + embed(c)`: the loss `f_l - max_{j != l} f_j` [A], whether the label changed [A], and the
        coordinates of `P grad L` (shaped like `c`)."""
        point = (chunk.x0 + subspaces.embed(c, chunk.subspace)).detach().requires_grad_(True)
        logits = checked_logits(model, point)
        self.observer.model_pass("gradient", point.shape[0])
        own = logits.gather(1, chunk.labels[:, None])[:, 0]
        others = logits.scatter(1, chunk.labels[:, None], -torch.inf).amax(dim=1)
        loss = own - others
        (grad,) = torch.autograd.grad(loss.sum(), point)
        adversarial = logits.detach().argmax(dim=1) != chunk.labels
        return loss.detach(), adversarial, _projected(grad, chunk.subspace, subspaces)

    @staticmethod
    def _update_budget(
        state: _Search,
        adversarial: torch.Tensor,
        norm: torch.Tensor,
        loss: torch.Tensor,
        grad_norm: torch.Tensor,
        gamma: float,
    ) -> None:
        """FMN's budget rule: shrink while adversarial, grow after the first adversarial point, else the linear
        estimate `||c|| + |L| / ||g||` of the boundary distance, overshot by `1 + gamma`."""
        safe = torch.where(grad_norm > 0, grad_norm, 1.0)
        estimate = torch.where(grad_norm > 0, (norm + loss.abs() / safe) * (1.0 + gamma), torch.inf)
        shrunk = torch.minimum(state.eps * (1.0 - gamma), state.best_norm)
        grown = torch.where(state.found, state.eps * (1.0 + gamma), estimate)
        state.eps = torch.where(adversarial, shrunk, grown)

    @staticmethod
    def _step(state: _Search, grad: torch.Tensor, ratio: float) -> None:
        """`c <- c - ratio eps g / ||g||`, projected onto the ball `||c|| <= eps`; rows whose projected gradient
        vanishes or whose budget is not finite stay put."""
        grad_norm = _norms(grad)
        movable = (grad_norm > 0) & torch.isfinite(state.eps)
        length = torch.where(movable, ratio * state.eps / torch.where(movable, grad_norm, 1.0), 0.0)
        c = state.c - _expand(length, grad) * grad
        norm = _norms(c)
        shrink = torch.where(norm > state.eps, state.eps / torch.where(norm > 0, norm, 1.0), 1.0)
        state.c = torch.where(_expand(movable, c), c * _expand(shrink, c), state.c)

    def _bisect(self, model: nn.Module, chunk: _Chunk, subspaces: SubspaceFamily, state: _Search) -> torch.Tensor:
        """The smallest adversarial `t best` found by bisection over t in (0, 1] (t = 1 is adversarial)."""
        low = torch.zeros_like(state.best_norm)
        high = torch.ones_like(state.best_norm)
        with torch.no_grad():
            for _ in range(self.search_steps):
                middle = (low + high) / 2.0
                point = chunk.x0 + subspaces.embed(state.best * _expand(middle, state.best), chunk.subspace)
                adversarial = checked_logits(model, point).argmax(dim=1) != chunk.labels
                self.observer.model_pass("check", point.shape[0])
                high = torch.where(adversarial, middle, high)
                low = torch.where(adversarial, low, middle)
        return state.best * _expand(high, state.best)


def _projected(grad: torch.Tensor, subspace: torch.Tensor, subspaces: SubspaceFamily) -> torch.Tensor:
    """Subspace coordinates of `grad: [A, C, H, W]` (= `P grad`), set to zero where `||P grad||` is below the
    rounding error of the projection (`eps ||grad||`): there the subspace is orthogonal to the gradient and a
    linear estimate `|L| / ||P grad||` would send the row to a meaningless, possibly overflowing, distance."""
    coords = subspaces.coordinates(grad, subspace)
    noise = torch.finfo(grad.dtype).eps * _norms(grad)
    return torch.where(_expand(_norms(coords) > noise, coords), coords, 0.0)


def _norms(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of each row of `t: [A, ...]` -> [A]."""
    return t.flatten(1).norm(dim=1)


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values: [A]` shaped to broadcast against `like: [A, ...]`."""
    return values.view(-1, *([1] * (like.dim() - 1)))
