"""How much could tighter intermediate bounds raise the certified margins of attacks/certify? An estimate, before
building a method for it (alpha-CROWN's optimised intermediate slopes, LP or MIP boxes).

CROWN's final bound at a radius eps relaxes every unstable ReLU inside the box of its input, and those boxes come
from CROWN itself. Here they are replaced by *inner* boxes: for each pre-activation neuron, the smallest and largest
value seen over projected gradient steps inside the row's eps-ball (one run per neuron and sign, from the neuron's
own gradient direction at the clean point; every point also updates every other neuron's box). Inner boxes lie
inside the exact ones, so the radius the final CROWN pass then proves is an estimate from above of what any sound
tightening of the intermediate bounds can give while keeping CROWN's final relaxation: the headroom. It is not a
certificate (the inner boxes are unsound by design). Per row, a bisection in log scale between the CROWN radius
(`SubspaceCertifier`'s search) and the FMN margin (the upper end). Prints, per subspace and overall, the medians of
CROWN / FMN, headroom / FMN and headroom / CROWN. Benchmarks print figures and assert nothing.

    python benchmarks/certify_headroom.py
        --checkpoint outputs/reproduce_mnist/logs/mnist_lenet/reproduce/checkpoints/last.ckpt
        [--samples 2] [--subspaces 0,20] [--layers all|5,9] [--pgd-steps 20] [--bisection 7] [--threads 2]
        [--data-dir ../shared/data]

`--layers` keeps CROWN's boxes except at those operation indices (the printed list names each one's shape).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attacks.certify.bounds import Plan, Prefix, Propagation, prefix_functions, rounding_tau  # noqa: E402
from attacks.certify.certifier import basis_images, certify_network, clean_margins  # noqa: E402
from attacks.certify.graph import Affine, Network  # noqa: E402
from attacks.certify.search import SearchSettings, SearchStats, certified_radii, margin_specs  # noqa: E402
from attacks.fmn import SubspaceFMN  # noqa: E402
from frequency import DCTBlockSubspaces  # noqa: E402
from margins.inputs import load_model_and_data  # noqa: E402

F64 = torch.float64


class InnerBoxPropagation(Propagation):
    """CROWN's propagation with the boxes of the operations in `inner` ({index: (lower, upper) [R, n]}) replaced by
    those (checked to lie inside CROWN's own)."""

    def __init__(self, *args, inner: dict[int, tuple[torch.Tensor, torch.Tensor]], **kwargs):
        super().__init__(*args, **kwargs)
        self.inner = inner

    def _affine(self, index: int, op: Affine) -> None:
        super()._affine(index, op)
        if index in self.inner:
            lower, upper = self.box[index]
            inner_lower, inner_upper = (t.view_as(lower) for t in self.inner[index])
            slack = 1e-9 * (1.0 + upper.abs().amax())
            if not bool((inner_lower >= lower - slack).all() and (inner_upper <= upper + slack).all()):
                raise AssertionError(f"a point of the ball lies outside CROWN's box of operation {index}: a bug")
            self.box[index] = (inner_lower, inner_upper)


def inner_boxes(
    net: Network, x0: torch.Tensor, basis: torch.Tensor, eps: float, targets: list[int], steps: int
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """For one row (clean image `x0: [*image_shape]`, basis images `basis: [k, *image_shape]`, radius `eps`): the
    smallest and largest value [n] of each neuron of the operations `targets` over the points visited by projected
    normalised gradient steps (step eps, then x0.75 each step) in the ball, one run per neuron and sign."""
    with torch.no_grad():
        values = net.forward(x0.unsqueeze(0))
    boxes = {t: (values[t].flatten(1)[0].clone(), values[t].flatten(1)[0].clone()) for t in targets}
    k = basis.shape[0]
    for target in targets:
        n = boxes[target][0].numel()
        sign = torch.cat([torch.ones(n, dtype=F64), -torch.ones(n, dtype=F64)])
        neuron = torch.cat([torch.arange(n), torch.arange(n)]).unsqueeze(1)
        z = torch.zeros(2 * n, k, dtype=F64, requires_grad=True)
        step = eps
        for _ in range(steps + 1):
            values = net.forward(x0 + torch.einsum("pk,k...->p...", z, basis))
            with torch.no_grad():
                for t in targets:
                    seen = values[t].flatten(1)
                    boxes[t] = (torch.minimum(boxes[t][0], seen.amin(0)), torch.maximum(boxes[t][1], seen.amax(0)))
            objective = (sign * values[target].flatten(1).gather(1, neuron).squeeze(1)).sum()
            (grad,) = torch.autograd.grad(objective, z)
            with torch.no_grad():
                moved = z + step * grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-300)
                z.copy_(moved * (eps / moved.norm(dim=1, keepdim=True).clamp(min=eps)))
            step *= 0.75
    return boxes


def headroom_radii(
    net: Network, plan: Plan, prefix: Prefix, rows: torch.Tensor, labels: torch.Tensor, crown: torch.Tensor,
    upper: torch.Tensor, targets: list[int], args: argparse.Namespace,
) -> torch.Tensor:  # fmt: skip
    """The largest radius [R] the final CROWN pass proves with inner boxes at `targets`, by a bisection in log scale
    between the CROWN radii `crown` and the upper ends `upper` (`rows`: the clean images and basis images per row)."""
    x0, basis = rows
    low, high, best = crown.clone(), upper.clone(), crown.clone()
    lam, tau = margin_specs(labels, net.num_classes, F64), rounding_tau(F64)
    for _ in range(args.bisection):
        eps = torch.sqrt(low * high)
        per_row = [inner_boxes(net, x0[r], basis[r], float(eps[r]), targets, args.pgd_steps) for r in range(len(eps))]
        inner = {t: tuple(torch.stack([b[t][side] for b in per_row]) for side in (0, 1)) for t in targets}
        with torch.no_grad():
            propagation = InnerBoxPropagation(net, plan, prefix, eps, inner=inner).run()
            radius = propagation.backward(net.output, lam).radius(eps, tau)
        best = torch.maximum(best, radius)
        proved = radius >= eps
        low, high = torch.where(proved, eps, torch.maximum(low, radius)), torch.where(proved, high, eps)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--subspaces", default="0,20")
    parser.add_argument("--layers", default="all")
    parser.add_argument("--pgd-steps", type=int, default=20)
    parser.add_argument("--bisection", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    model, datamodule = load_model_and_data(args.checkpoint, data_dir=str(args.data_dir))
    model = model.to(F64).eval()
    dataset = datamodule.margin_dataset()
    x = torch.stack([dataset[i][0] for i in range(args.samples)]).to(F64)
    family = DCTBlockSubspaces(tuple(x.shape[1:]), 8, 1)
    chosen = [int(s) for s in args.subspaces.split(",")]
    sample_index = torch.arange(args.samples).repeat_interleave(len(chosen))
    subspace_index = torch.tensor(chosen).repeat(args.samples)

    fmn = SubspaceFMN(dtype=F64).attack_rows(model, x, family, sample_index, subspace_index, False)
    keep = fmn.converged.nonzero().squeeze(1)  # rows with a finite upper end
    sample_index, subspace_index, labels, fmn_margins = (
        t[keep] for t in (sample_index, subspace_index, fmn.labels, fmn.margins)
    )
    net = certify_network(model, tuple(x.shape[1:]))
    plan = Plan.of(net)
    targets = [i for i in sorted(plan.pre) if i not in plan.exact and isinstance(net.ops[i], Affine)]
    if args.layers != "all":
        targets = [int(i) for i in args.layers.split(",")]
    unique, position = torch.unique(subspace_index, return_inverse=True)
    basis = basis_images(family, unique, x)
    per_subspace, prefix = prefix_functions(net, plan, basis, x[sample_index])
    prefix = prefix.with_rows(per_subspace, position)
    clean = clean_margins(net, x[sample_index], labels)
    crown, _ = certified_radii(net, plan, prefix, labels, fmn_margins, clean, SearchSettings(), SearchStats())
    rows = (x[sample_index], basis[position])
    headroom = headroom_radii(net, plan, prefix, rows, labels, crown, fmn_margins, targets, args)

    print(f"{args.checkpoint}: {len(keep)} rows ({args.samples} samples x subspaces {chosen}, FMN converged)")
    print("inner boxes at: " + ", ".join(f"{i} {type(net.ops[i]).__name__} {net.ops[i].shape}" for i in targets))
    print("subspace | CROWN / FMN | headroom / FMN | headroom / CROWN (medians)")
    groups = [(str(s), subspace_index == s) for s in chosen] + [("all", torch.ones_like(crown, dtype=torch.bool))]
    for name, rows_in in groups:
        ratios = [(crown / fmn_margins)[rows_in], (headroom / fmn_margins)[rows_in], (headroom / crown)[rows_in]]
        print(f"{name} | " + " | ".join(f"{float(r.median()):.4f}" for r in ratios))
    print(f"{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
