"""`SubspaceCertifier`: certified lower bounds on the margin along subspaces, as a margin estimator."""

from __future__ import annotations

import time

import torch
from torch import nn

from attacks.certify.bounds import Plan, prefix_functions
from attacks.certify.graph import Network, network_ops
from attacks.certify.search import SearchSettings, SearchStats, certified_radii
from attacks.common import RowResult, model_device, progress_bar
from attacks.deepfool import SubspaceDeepFool
from attacks.estimator import MarginEstimator, RowTask
from attacks.fmn import SubspaceFMN
from attacks.kernels import PreparedModel, prepare_model
from frequency.subspaces import SubspaceFamily

# Bumped whenever a change moves the certified values (relaxations, search); result folders record it.
CERTIFY_VERSION = 3
METHODS = ("crown", "alpha-crown", "bab")
INTERMEDIATE = ("backward", "forward")
UPPER = ("deepfool", "fmn", "none")


class SubspaceCertifier(MarginEstimator):
    """Certified lower bounds on the margin of every (sample, subspace) row, by linear bound propagation.

    For a row (x, subspace S with orthonormal basis B, clean predicted label l) the certificate at radius eps
    proves `f_l(x + B z) > f_j(x + B z)` for all j != l and all `||z||_2 <= eps` (`attacks.certify.bounds`); the
    row's result is the largest radius proved (`attacks.certify.search`), so its margin along S is at least that.

    Args:
        method: "crown" (linear relaxations, CROWN's adaptive lower slopes) or "alpha-crown" (lower slopes of the
            final bound optimised per row and margin, `alpha_steps` Adam steps of rate `alpha_lr`).
        intermediate: "backward" (CROWN's backward passes for pre-activation bounds; tighter) or "forward"
            (linear bounds in z propagated forward; cheaper on wide convolutional layers).
        upper: the attack run first on the rows, whose margin caps the search (no radius above a real label change
            can be proved): "deepfool" (`SubspaceDeepFool` defaults), "fmn" (`SubspaceFMN` defaults; smaller,
            costs more) or "none" (the search grows the radius without a cap). A row where the attack did not
            change the label has no cap.
        steps: bound evaluations per row at most; rtol: relative width of the final bracket.
        batch_size: rows bounded together (memory grows with it: LeNet about 10 MB per row in float64).
        dtype: float64 (default) or float32; float32 bounds carry a larger rounding allowance
            (`attacks.certify.bounds`: 2^16 unit roundoffs relative to the magnitude of the terms), so they are
            sound but looser.

    Result fields (`RowResult`): `margins` the certified lower bounds (input-space L2 units); `converged` True
    where the upper-bound attack found a real label change, so the row's margin lies in [certified, attack
    margin]; `iterations` the bound evaluations of the search; `labels` the clean predicted labels;
    `perturbed_labels` the attack's labels (the clean label with upper="none"); `perturbations` the attack's
    perturbations when requested (zeros with upper="none"). `last_stats` holds the last call's time split.

    The certifier walks the layers of the plain model (`prepare` makes an eval-mode copy without the engine's CPU
    kernels); supported layers: convolution, linear, batch norm (eval), the model's normalisation, ReLU, max and
    average pooling, flatten, residual additions. Any other layer raises `UnsupportedLayerError` (an
    `InputError`) naming it.
    """

    def __init__(
        self,
        method: str = "crown",
        intermediate: str = "backward",
        upper: str = "deepfool",
        steps: int = 12,
        rtol: float = 0.01,
        alpha_steps: int = 20,
        alpha_lr: float = 0.5,
        bab_domains: int = 16,
        batch_size: int = 32,
        dtype: torch.dtype = torch.float64,
    ):
        if method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
        if intermediate not in INTERMEDIATE:
            raise ValueError(f"intermediate must be one of {', '.join(INTERMEDIATE)}, got {intermediate!r}")
        if upper not in UPPER:
            raise ValueError(f"upper must be one of {', '.join(UPPER)}, got {upper!r}")
        if steps < 1 or not rtol > 0 or alpha_steps < 0 or not alpha_lr > 0 or bab_domains < 1:
            raise ValueError("steps and bab_domains must be >= 1, rtol > 0, alpha_steps >= 0 and alpha_lr > 0")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
        super().__init__(2, batch_size, dtype, "off")  # candidates: unused (the margin is bounded against every class)
        self.method, self.intermediate, self.upper = method, intermediate, upper
        self.search = SearchSettings(method, intermediate, int(steps), float(rtol), alpha_steps=int(alpha_steps),
                                     alpha_lr=float(alpha_lr), bab_domains=int(bab_domains))  # fmt: skip
        self.last_stats = SearchStats()

    def settings(self) -> dict[str, object]:
        """The settings that determine the results, for result summaries."""
        out: dict[str, object] = {
            "estimator": "certify",
            "bound": "lower",
            "version": CERTIFY_VERSION,
            "method": self.method,
            "intermediate": self.intermediate,
            "upper": self.upper,
            "steps": self.search.steps,
            "rtol": self.search.rtol,
        }
        if self.method == "alpha-crown":
            out.update(alpha_steps=self.search.alpha_steps, alpha_lr=self.search.alpha_lr)
        if self.method == "bab":
            out.update(bab_domains=self.search.bab_domains)
        return out

    def prepare(self, model: nn.Module, device: torch.device | str | None = None) -> PreparedModel:
        """An eval-mode copy of `model` in this certifier's dtype, without the engine's kernels (the certifier reads
        the model's own layers)."""
        return prepare_model(model, device, self.dtype, "off")

    def _attack(self, task: RowTask) -> RowResult:
        model, x, subspaces = task.model, task.x, task.subspaces
        sample_index, subspace_index = task.sample_index, task.subspace_index
        if model.kernels:
            raise ValueError(
                f"the model was prepared with the kernels {sorted(model.kernels)}; the certifier needs the plain "
                "model: pass the model itself or certifier.prepare(model)"
            )
        self.last_stats = SearchStats()
        start = time.perf_counter()
        net = network_ops(model.module, tuple(x.shape[1:]), model.dtype, model.device)
        family = subspaces.to(model.device)
        attack = self._upper_bounds(task)
        self.last_stats.add("upper", start)
        labels = attack.labels
        cap = torch.where(attack.converged, attack.margins, torch.inf)
        margins = torch.zeros_like(cap)
        iterations = torch.zeros_like(sample_index)
        plan = Plan.of(net)
        order = torch.sort(subspace_index, stable=True).indices
        bar = progress_bar(order.numel(), task.progress, "certified (sample, subspace) rows")
        for chunk in order.split(rows_per_batch(net, plan, self.batch_size, x.element_size())):
            unique, position = torch.unique(subspace_index[chunk], return_inverse=True)
            per_subspace, prefix = prefix_functions(net, plan, basis_images(family, unique, x), x[sample_index[chunk]])
            prefix = prefix.with_rows(per_subspace, position)
            clean = clean_margins(net, x[sample_index[chunk]], labels[chunk])
            radius, steps = certified_radii(
                net, plan, prefix, labels[chunk], cap[chunk], clean, self.search, self.last_stats
            )
            margins[chunk], iterations[chunk] = radius, steps
            bar.update(chunk.numel())
        bar.close()
        return RowResult(
            margins=margins,
            converged=attack.converged,
            iterations=iterations,
            labels=labels,
            perturbed_labels=attack.perturbed_labels,
            perturbations=attack.perturbations,
        )

    def _upper_bounds(self, task: RowTask) -> RowResult:
        """The upper-bound attack's result on the rows, run on the plain model (with upper="none": clean labels,
        nothing converged)."""
        model, x, sample_index = task.model.module, task.x, task.sample_index
        if self.upper == "none":
            with torch.no_grad():
                labels = model(x).argmax(dim=1)[sample_index]
            rows = sample_index.numel()
            return RowResult(
                margins=torch.full((rows,), torch.inf, dtype=x.dtype, device=x.device),
                converged=torch.zeros(rows, dtype=torch.bool, device=x.device),
                iterations=torch.zeros(rows, dtype=torch.long, device=x.device),
                labels=labels,
                perturbed_labels=labels.clone(),
                perturbations=x.new_zeros(rows, *x.shape[1:]) if task.return_perturbations else None,
            )
        attack = SubspaceDeepFool(dtype=x.dtype) if self.upper == "deepfool" else SubspaceFMN(dtype=x.dtype)
        return attack.attack_rows(
            model, x, task.subspaces, sample_index, task.subspace_index, task.return_perturbations
        )


MEMORY_BYTES = 2 * 1024**3  # bounds of one batch of rows stay within about this much memory


def rows_per_batch(net: Network, plan: Plan, batch_size: int, element_size: int, k: int = 64) -> int:
    """Rows bounded together: `batch_size`, fewer where the linear bounds of one row (lower and upper coefficients
    [k, *shape] of every operation that keeps them, and backward passes of a similar size) would exceed
    `MEMORY_BYTES` for the batch."""
    kept = sum(net.ops[i].size for i in (*plan.cut, *plan.direct))
    per_row = 4 * k * kept * element_size
    return max(1, min(batch_size, MEMORY_BYTES // max(per_row, 1)))


def clean_margins(net: Network, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`min_j f_l(x) - f_j(x)` [R] for images `x: [R, *image_shape]` with labels `labels` [R]."""
    with torch.no_grad():
        logits = net.forward(x)[net.output]
    own = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    return own - logits.scatter(1, labels.unsqueeze(1), -torch.inf).amax(dim=1)


def basis_images(family: SubspaceFamily, subspaces: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The images of the coordinate basis vectors of each subspace: [U, k, *image_shape] (k = the coordinates'
    size; a family padding its coordinates gives zero images for the padding)."""
    image = x.new_zeros(1, *x.shape[1:])
    shape = family.coordinates(image, subspaces[:1]).shape[1:]
    k = int(torch.Size(shape).numel())
    eye = torch.eye(k, dtype=x.dtype, device=x.device).view(k, *shape)
    images = [family.embed(eye, torch.full((k,), int(s), device=x.device)) for s in subspaces.tolist()]
    return torch.stack(images)


def certify_network(model: nn.Module, image_shape: tuple[int, ...], dtype: torch.dtype = torch.float64) -> Network:
    """The operations the certifier bounds for `model` (raises `UnsupportedLayerError` on any other layer)."""
    return network_ops(model, image_shape, dtype, model_device(model))
