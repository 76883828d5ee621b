"""The certifier's soundness, first: every bound it computes contains the network's actual values, and no label
change exists inside a certified radius (checked by attacks inside the ball, a polar grid of a 2-D disc, and the
exact margin of small networks by enumerating their linear regions on a 2-D subspace). Then exactness on affine
models, the interface (settings, unsupported layers, prepared models) and the modes' tightness order.

Independent references: the network's own forward pass at sampled points (not the certifier's graph), the closed-form
margin of an affine classifier, `SubspaceFMN`, projected gradient ascent from random starts, and region enumeration
(`exact_margin_2d`, plain polygon clipping in float64).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attacks.certify import SubspaceCertifier, UnsupportedLayerError
from attacks.certify.bounds import Plan, Propagation, prefix_functions, rounding_tau
from attacks.certify.certifier import basis_images
from attacks.certify.graph import network_ops
from attacks.certify.search import margin_specs
from attacks.deepfool import SubspaceDeepFool
from attacks.fmn import SubspaceFMN
from attacks.kernels import prepare_model
from common.errors import InputError
from frequency.subspaces import BasisSubspaces, DCTBlockSubspaces
from models import Normalize, NormalizedModel
from tests.conftest import affine_model

F64 = torch.float64


# ---- tiny networks ------------------------------------------------------------------------------------------------
class Residual(nn.Module):
    """conv-bn-relu-conv-bn plus the input, then ReLU (a ResNet basic block) between a stem and a head."""

    def __init__(self, channels: int = 3):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.head = nn.Linear(channels * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = nn.functional.max_pool2d(h, 3, stride=2, padding=1)  # overlapping windows with padding
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(h)))))
        out = torch.relu(out + h)
        out = nn.functional.adaptive_avg_pool2d(out, 2)
        return self.head(torch.flatten(out, 1))


def mlp(width: int = 20, depth: int = 2, classes: int = 3, side: int = 4) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    features = side * side
    for _ in range(depth):
        layers += [nn.Linear(features, width), nn.ReLU()]
        features = width
    return nn.Sequential(*layers, nn.Linear(features, classes))


def convnet() -> nn.Module:
    """LeNet's pattern at 8x8: conv, ReLU, 2x2 max-pool, conv, ReLU, max-pool, two linear layers."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 4),
    )  # fmt: skip


def normalized(net: nn.Module, side: int) -> nn.Module:
    return NormalizedModel(Normalize(0.3, 0.7, (1, side, side)), net)


def randomised_batchnorms(model: nn.Module) -> nn.Module:
    """Batch norms with non-trivial running statistics and affine parameters (eval mode)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            with torch.no_grad():
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.3, 0.3)
    return model.eval()


NETWORKS = {
    "mlp": (lambda: normalized(mlp(), 4), 4),
    "convnet": (lambda: normalized(convnet(), 8), 8),
    "residual": (lambda: normalized(randomised_batchnorms(Residual()), 4), 4),
}


def random_family(side: int, dims: tuple[int, ...], seed: int) -> BasisSubspaces:
    generator = torch.Generator().manual_seed(seed)
    bases = [torch.linalg.qr(torch.randn(side * side, k, generator=generator, dtype=F64))[0] for k in dims]
    return BasisSubspaces(bases, (1, side, side))


def ball_points(count: int, k: int, radius: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`count` points per row in the balls of radii `radius` [R] in R^k: half on the sphere, half inside: [R, count,
    k]."""
    direction = torch.randn(radius.shape[0], count, k, generator=generator, dtype=F64)
    direction = direction / direction.norm(dim=2, keepdim=True)
    scale = torch.rand(radius.shape[0], count, 1, generator=generator, dtype=F64) ** (1.0 / k)
    scale[:, : count // 2] = 1.0
    return direction * scale * radius.view(-1, 1, 1)


# ---- soundness: bounds contain sampled values -----------------------------------------------------------------------
@pytest.mark.parametrize("keep", ["all", "cut"])
@pytest.mark.parametrize("intermediate", ["backward", "forward"])
@pytest.mark.parametrize("name", list(NETWORKS))
def test_every_bound_contains_the_values_at_points_sampled_in_the_ball(name, intermediate, keep):
    """keep "all": every operation's linear bounds formed and kept for the check; "cut": as in a run (ReLUs read
    only by max-pools stay implicit; the cut's linear bounds are checked)."""
    build, side = NETWORKS[name]
    model = build().to(F64).eval()
    family = random_family(side, (3, 5), seed=1)
    x = torch.rand(3, 1, side, side, dtype=F64)
    net = network_ops(model, (1, side, side), F64, "cpu")
    plan = Plan.of(net)
    sample = torch.tensor([0, 1, 2, 0, 1, 2])
    subspace = torch.tensor([0, 0, 0, 1, 1, 1])
    unique, position = torch.unique(subspace, return_inverse=True)
    per_subspace, prefix = prefix_functions(net, plan, basis_images(family, unique, x), x[sample])
    eps = torch.tensor([0.05, 0.3, 1.0, 0.1, 0.5, 2.0], dtype=F64)
    propagation = Propagation(net, plan, prefix.with_rows(per_subspace, position), eps, intermediate)
    propagation.keep_linear = set(range(len(net.ops))) if keep == "all" else None
    propagation.run()
    labels = model(x).argmax(1)[sample]
    specs = margin_specs(labels, net.num_classes, F64)
    final = propagation.backward(net.output, specs)
    generator = torch.Generator().manual_seed(2)
    k = max(family.dims)
    z = ball_points(200, k, eps, generator)  # [R, 200, k]
    for row in range(eps.shape[0]):
        coords = z[row].clone()
        coords[:, family.dims[subspace[row]] :] = 0.0
        images = x[sample[row]] + family.embed(coords, torch.full((200,), int(subspace[row])))
        values = net.forward(images)
        logits = model(images)
        assert torch.allclose(values[net.output], logits, atol=1e-12, rtol=1e-12)  # the graph is the model
        for index, value in enumerate(values):
            if index not in propagation.box:
                continue
            lower, upper = propagation.box[index]
            assert (value >= lower[row]).all() and (value <= upper[row]).all(), (name, index, row)
            if index in propagation.linear:
                bounds = propagation.linear[index]
                low = torch.einsum("k...,nk->n...", bounds.lower_coef[row], coords) + bounds.lower_const[row]
                high = torch.einsum("k...,nk->n...", bounds.upper_coef[row], coords) + bounds.upper_const[row]
                assert (value >= low - 1e-12).all() and (value <= high + 1e-12).all(), (name, index, row)
        margins = (specs[row] @ logits.T).T  # [200, C-1]
        linear = coords @ final.coef[row].T + final.const[row]
        assert (margins >= linear - 1e-12).all(), (name, row)
        assert (margins >= final.lower(eps, rounding_tau(F64))[row]).all(), (name, row)


def test_relaxations_are_exercised():
    """The sampled-containment test above sees unstable ReLUs and max-pools whose upper bound is not exact."""
    build, side = NETWORKS["convnet"]
    model = build().to(F64).eval()
    family = random_family(side, (5,), seed=1)
    x = torch.rand(2, 1, side, side, dtype=F64)
    net = network_ops(model, (1, side, side), F64, "cpu")
    plan = Plan.of(net)
    per_subspace, prefix = prefix_functions(net, plan, basis_images(family, torch.tensor([0]), x), x)
    eps = torch.tensor([0.3, 1.0], dtype=F64)
    propagation = Propagation(net, plan, prefix.with_rows(per_subspace, torch.tensor([0, 0])), eps).run()
    unstable = sum(int(r.unstable.sum()) for r in propagation.relax.values() if hasattr(r, "unstable"))
    pools = [r for r in propagation.relax.values() if hasattr(r, "upper_use")]
    assert unstable > 10
    assert any(bool((~p.upper_use).any()) for p in pools) and any(bool(p.upper_use.any()) for p in pools)


def test_a_relu_input_proved_off_gets_no_lower_bound_pass_and_nothing_else_changes():
    """Where only ReLUs read a pre-activation, a neuron whose backward upper bound is <= 0 needs no lower bound (its
    ReLU is 0 on the whole ball): skipping that pass leaves every relaxation, every ReLU's box and the final bounds
    bit for bit as with the pass, and saves the specifications (the LeNet-like convnet's linear layers)."""
    build, side = NETWORKS["convnet"]
    with torch.random.fork_rng():  # the other tests' random stream is left as it was
        torch.manual_seed(5)  # weights with neurons proved off (8 of 72 specifications saved)
        model = build().to(F64).eval()
    family = random_family(side, (5,), seed=2)
    x = torch.rand(4, 1, side, side, dtype=F64, generator=torch.Generator().manual_seed(4))
    net = network_ops(model, (1, side, side), F64, "cpu")
    plan = Plan.of(net)
    per_subspace, prefix = prefix_functions(net, plan, basis_images(family, torch.tensor([0]), x), x)
    eps = torch.tensor([0.05, 0.1, 0.2, 0.4], dtype=F64)
    runs = {}
    for skip in (True, False):
        propagation = Propagation(net, plan, prefix.with_rows(per_subspace, torch.zeros(4, dtype=torch.long)), eps)
        propagation.skip_off_lower, specs, backward = skip, [], propagation.backward

        def counted(target, lam, *args, _backward=backward, _specs=specs, **kwargs):
            _specs.append(int((lam != 0).sum()))  # the specifications asked for, padding left out
            return _backward(target, lam, *args, **kwargs)

        propagation.backward = counted
        propagation.run()
        labels = model(x).argmax(1)
        final = backward(net.output, margin_specs(labels, net.num_classes, F64))
        runs[skip] = propagation, final, sum(specs)
    (fast, fast_final, fast_specs), (full, full_final, full_specs) = runs[True], runs[False]
    assert fast_specs < full_specs  # some neurons were proved off after their upper-bound pass
    assert torch.equal(fast_final.coef, full_final.coef) and torch.equal(fast_final.const, full_final.const)
    for index, relax in full.relax.items():
        for field, value in vars(relax).items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(getattr(fast.relax[index], field), value), (index, field)
        assert all(torch.equal(a, b) for a, b in zip(fast.box[index], full.box[index])), index


def test_the_max_pool_and_relu_backward_step_at_once_equals_the_two_steps():
    """A max-pool tiling the ReLU before it is passed backward in one step at the pool's resolution: every box,
    relaxation and the final bounds equal those of the pool's step then the ReLU's (to rounding), on the convnet at
    radii where windows have their lower and upper bounds on one input and on two."""
    build, side = NETWORKS["convnet"]
    with torch.random.fork_rng():
        torch.manual_seed(5)
        model = build().to(F64).eval()
    family = random_family(side, (5,), seed=2)
    x = torch.rand(4, 1, side, side, dtype=F64, generator=torch.Generator().manual_seed(4))
    net = network_ops(model, (1, side, side), F64, "cpu")
    labels = model(x).argmax(1)
    per_subspace, prefix = prefix_functions(net, Plan.of(net), basis_images(family, torch.tensor([0]), x), x)
    eps = torch.tensor([0.05, 0.1, 0.2, 0.4], dtype=F64)
    runs = {}
    for fused in (True, False):
        plan = Plan.of(net)
        if not fused:
            plan.fused = set()
        propagation = Propagation(net, plan, prefix.with_rows(per_subspace, torch.zeros(4, dtype=torch.long)), eps)
        propagation.run()
        runs[fused] = propagation, propagation.backward(net.output, margin_specs(labels, net.num_classes, F64))
    (one, one_final), (two, two_final) = runs[True], runs[False]
    plan = Plan.of(net)
    (pool_index,) = [i for i, op in enumerate(net.ops) if op.inputs and op.inputs[0] in plan.fused - plan.cut]
    pool = one.relax[pool_index]  # the second max-pool (the first ReLU and max-pool are in the cut)
    same = (pool.lower_at == pool.upper_at) & pool.upper_use.flatten(1)
    assert bool(same.any()) and bool((~same & pool.upper_use.flatten(1)).any())
    torch.testing.assert_close(one_final.coef, two_final.coef, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(one_final.const, two_final.const, rtol=1e-12, atol=1e-12)
    for index in two.box:
        torch.testing.assert_close(one.box[index], two.box[index], rtol=1e-12, atol=1e-12)


def test_a_small_convolution_applied_as_a_dense_matrix_equals_the_convolution():
    """Convolutions small enough for a dense matrix (strided, padded, grouped) give the convolution's values for W
    and |W| (to rounding); larger ones keep the convolution."""
    from attacks.certify.graph import DENSE_ENTRIES, Conv

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 2, 3, 3, dtype=F64, generator=generator)
    conv = Conv((0,), (6, 4, 4), "conv", weight, None, (2, 2), (1, 1), (1, 1), 2, (4, 7, 7))
    h = torch.randn(3, 5, 4, 7, 7, dtype=F64, generator=generator)
    assert conv._matrices() is not None
    for absolute, expected_weight in ((False, weight), (True, weight.abs())):
        expected = conv._conv(h, expected_weight)
        got = conv.absolute([h]) if absolute else conv.linear([h])
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    wide = Conv((0,), (8, 64, 64), "wide", torch.randn(8, 8, 3, 3, dtype=F64), None, (1, 1), (1, 1), (1, 1), 1,
                (8, 64, 64))  # fmt: skip
    assert 8 * 64 * 64 * 8 * 64 * 64 > DENSE_ENTRIES and wide._matrices() is None


# ---- soundness: no label change inside the certified radius --------------------------------------------------------
def strongest_point_in_ball(model, x0, basis, radius, starts: int = 16, steps: int = 200, seed: int = 0):
    """Projected gradient ascent on `max_j f_j - f_l` over `||z|| <= radius` from random starts: the largest value
    found [R] (a label change exists where it is > 0). `basis`: [R, k, *image] images of the coordinate vectors."""
    generator = torch.Generator().manual_seed(seed)
    rows, k = basis.shape[:2]
    labels = model(x0).argmax(1)
    z = ball_points(starts, k, radius, generator).reshape(rows * starts, k).requires_grad_(True)
    big_basis = basis.repeat_interleave(starts, 0)
    big_x0, big_labels = x0.repeat_interleave(starts, 0), labels.repeat_interleave(starts)
    big_radius = radius.repeat_interleave(starts)
    best = torch.full((rows * starts,), -torch.inf, dtype=F64)
    step = big_radius / 20.0
    for _ in range(steps):
        images = big_x0 + torch.einsum("rk,rk...->r...", z, big_basis)
        logits = model(images)
        own = logits.gather(1, big_labels[:, None])[:, 0]
        other = logits.scatter(1, big_labels[:, None], -torch.inf).amax(1)
        gap = other - own
        best = torch.maximum(best, gap.detach())
        (grad,) = torch.autograd.grad(gap.sum(), z)
        with torch.no_grad():
            z += step[:, None] * grad / grad.norm(dim=1, keepdim=True).clamp(min=1e-30)
            z *= (big_radius / z.norm(dim=1).clamp(min=1e-30)).clamp(max=1.0)[:, None]
    return best.view(rows, starts).amax(1)


@pytest.mark.parametrize(
    "name, method", [("mlp", "crown"), ("convnet", "crown"), ("residual", "crown"), ("convnet", "alpha-crown"),
                     ("convnet", "bab"), ("residual", "bab")]
)  # fmt: skip
def test_no_label_change_inside_the_certified_radius(name, method):
    build, side = NETWORKS[name]
    torch.manual_seed(3)
    model = build().to(F64).eval()
    family = random_family(side, (4, 6), seed=4)
    x = torch.rand(6, 1, side, side, dtype=F64)
    result = SubspaceCertifier(method=method, upper="none", steps=20)(model, x, family)
    fmn = SubspaceFMN(steps=500, dtype=F64)(model, x, family)
    radius = result.margins
    assert (radius > 0).all()
    converged = fmn.converged
    assert converged.any()
    assert (radius[converged] <= fmn.margins[converged]).all()  # an attack's margin is an upper bound
    sample = torch.arange(6).repeat(2)
    subspace = torch.arange(2).repeat_interleave(6)
    basis = torch.cat([basis_images(family, torch.tensor([s]), x).expand(6, -1, -1, -1, -1) for s in range(2)])
    gap = strongest_point_in_ball(model, x[sample], basis, radius.flatten())
    assert (gap < 0).all(), gap.max()
    assert subspace.numel() == gap.numel()


def test_a_polar_grid_of_the_certified_disc_has_no_label_change():
    build, side = NETWORKS["convnet"]
    torch.manual_seed(5)
    model = build().to(F64).eval()
    family = random_family(side, (2, 2), seed=6)
    x = torch.rand(3, 1, side, side, dtype=F64)
    result = SubspaceCertifier(upper="none", steps=20)(model, x, family)
    radii = torch.linspace(0.0, 1.0, 101, dtype=F64)
    angles = torch.linspace(0.0, 2 * math.pi, 361, dtype=F64)
    grid = torch.stack([torch.cos(angles)[None] * radii[:, None], torch.sin(angles)[None] * radii[:, None]], -1)
    grid = grid.reshape(-1, 2)
    labels = model(x).argmax(1)
    assert (result.margins > 0).all()
    for s in range(2):
        for n in range(3):
            images = x[n] + (grid * result.margins[s, n] @ family.bases[s].T).view(-1, 1, side, side)
            with torch.no_grad():
                assert (model(images).argmax(1) == labels[n]).all()


# ---- soundness: the exact margin of small networks on a 2-D subspace ----------------------------------------------
def _clip(polygon: list[tuple[float, float]], a: tuple[float, float], b: float) -> list[tuple[float, float]]:
    """The part of a convex polygon where `a . p + b >= 0` (Sutherland-Hodgman, one half-plane)."""
    out = []
    for i, p in enumerate(polygon):
        q = polygon[(i + 1) % len(polygon)]
        vp, vq = a[0] * p[0] + a[1] * p[1] + b, a[0] * q[0] + a[1] * q[1] + b
        if vp >= 0:
            out.append(p)
        if (vp >= 0) != (vq >= 0):
            t = vp / (vp - vq)
            out.append((p[0] + t * (q[0] - p[0]), p[1] + t * (q[1] - p[1])))
    return out


def _min_norm(polygon: list[tuple[float, float]]) -> float:
    """Distance from the origin to a convex polygon (0 inside it)."""
    if len(polygon) < 3:
        return min((math.hypot(*p) for p in polygon), default=math.inf)
    signs = [(q[0] - p[0]) * (-p[1]) - (q[1] - p[1]) * (-p[0]) for p, q in zip(polygon, polygon[1:] + polygon[:1])]
    if all(s >= 0 for s in signs) or all(s <= 0 for s in signs):
        return 0.0
    best = math.inf
    for p, q in zip(polygon, polygon[1:] + polygon[:1]):
        dx, dy = q[0] - p[0], q[1] - p[1]
        length = dx * dx + dy * dy
        t = 0.0 if length == 0 else max(0.0, min(1.0, -(p[0] * dx + p[1] * dy) / length))
        best = min(best, math.hypot(p[0] + t * dx, p[1] + t * dy))
    return best


def exact_margin_2d(linears: list[nn.Linear], x0: torch.Tensor, basis: torch.Tensor, half_width: float) -> float:
    """The exact margin of the MLP `linears` (ReLU between them) at `x0` [d] along the plane spanned by `basis`
    [d, 2], within the square [-half_width, half_width]^2 (inf if no label change there): every linear region of
    the network on the square, by clipping polygons with each layer's hyperplanes, and in each the distance to the
    part where another class scores at least the label's."""
    weight = basis.T.clone()  # the affine map of z so far: h = W^T z + c
    offset = x0.clone()
    square = [
        (-half_width, -half_width),
        (half_width, -half_width),
        (half_width, half_width),
        (-half_width, half_width),
    ]
    regions = [(square, weight, offset)]  # polygon, and the current layer's input as an affine function of z
    for layer, linear in enumerate(linears):
        w, b = linear.weight.detach(), linear.bias.detach()
        next_regions = []
        for polygon, a, c in regions:
            pre_a, pre_c = a @ w.T, w @ c + b  # [2, n], [n]
            if layer == len(linears) - 1:
                next_regions.append((polygon, pre_a, pre_c))
                continue
            pieces = [(polygon, torch.ones(w.shape[0], dtype=torch.bool))]
            for neuron in range(w.shape[0]):
                normal = (float(pre_a[0, neuron]), float(pre_a[1, neuron]))
                split = []
                for piece, active in pieces:
                    on = _clip(piece, normal, float(pre_c[neuron]))
                    off = _clip(piece, (-normal[0], -normal[1]), -float(pre_c[neuron]))
                    if len(on) >= 3:
                        split.append((on, active.clone()))
                    if len(off) >= 3:
                        mask = active.clone()
                        mask[neuron] = False
                        split.append((off, mask))
                pieces = split
            for piece, active in pieces:
                gate = active.to(F64)
                next_regions.append((piece, pre_a * gate, pre_c * gate))
        regions = next_regions
    label = int(torch.argmax(_forward(linears, x0)))
    best = math.inf
    for polygon, a, c in regions:
        for j in range(a.shape[1]):
            if j == label:
                continue
            normal = (float(a[0, j] - a[0, label]), float(a[1, j] - a[1, label]))
            part = _clip(polygon, normal, float(c[j] - c[label]))
            if part:
                best = min(best, _min_norm(part))
    return best


def _forward(linears: list[nn.Linear], x: torch.Tensor) -> torch.Tensor:
    for i, linear in enumerate(linears):
        x = linear(x)
        if i < len(linears) - 1:
            x = torch.relu(x)
    return x


@pytest.mark.parametrize("seed, method", [(0, "crown"), (1, "crown"), (2, "crown"), (0, "alpha-crown"), (1, "bab")])
def test_the_certified_radius_is_at_most_the_exact_margin_of_a_small_network(seed, method):
    torch.manual_seed(seed)
    model = mlp(width=20, depth=2, classes=3, side=4).to(F64).eval()  # 40 ReLUs
    linears = [m for m in model if isinstance(m, nn.Linear)]
    family = random_family(4, (2, 2), seed=10 + seed)
    x = torch.rand(4, 1, 4, 4, dtype=F64)
    result = SubspaceCertifier(method=method, upper="none", steps=20, bab_domains=64)(model, x, family)
    fmn = SubspaceFMN(steps=300, dtype=F64)(model, x, family)
    checked = 0
    for s in range(2):
        for n in range(4):
            if not fmn.converged[s, n]:
                continue
            half_width = 1.01 * float(fmn.margins[s, n])
            exact = exact_margin_2d(linears, x[n].flatten(), family.bases[s], half_width)
            assert exact <= fmn.margins[s, n] * (1 + 1e-9)  # the enumeration finds at least FMN's label change
            assert result.margins[s, n] <= exact * (1 + 1e-9), (s, n, float(result.margins[s, n]), exact)
            checked += 1
    assert checked >= 4


# ---- exactness on affine models -----------------------------------------------------------------------------------
def test_the_certified_margin_of_an_affine_model_is_its_exact_margin():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(5, 36, generator=generator, dtype=F64)
    bias = torch.randn(5, generator=generator, dtype=F64)
    model = affine_model(weight, bias)
    family = DCTBlockSubspaces((1, 6, 6), block=3, step=1)
    x = torch.rand(7, 1, 6, 6, dtype=F64, generator=generator)
    for upper in ("none", "deepfool"):
        result = SubspaceCertifier(upper=upper)(model, x, family)
        logits, labels = model(x), model(x).argmax(1)
        for s in range(len(family)):
            basis = basis_images(family, torch.tensor([s]), x)[0].flatten(1)  # [k, d]
            for n in range(x.shape[0]):
                label = int(labels[n])
                exact = min(
                    float((logits[n, label] - logits[n, j]).detach() / (basis @ (weight[label] - weight[j])).norm())
                    for j in range(5)
                    if j != label
                )
                assert result.margins[s, n] == pytest.approx(exact, rel=1e-9)


# ---- interface ----------------------------------------------------------------------------------------------------
def test_settings_say_lower_bound_and_the_method():
    settings = SubspaceCertifier(method="alpha-crown").settings()
    assert settings["bound"] == "lower" and settings["estimator"] == "certify"
    assert settings["method"] == "alpha-crown" and "alpha_steps" in settings
    with pytest.raises(ValueError, match="method"):
        SubspaceCertifier(method="exact")


def test_an_unsupported_layer_is_named():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 3)).to(F64)
    with pytest.raises(UnsupportedLayerError, match="GELU") as error:
        SubspaceCertifier(upper="none")(model, torch.rand(2, 1, 4, 4, dtype=F64), random_family(4, (2,), 0))
    assert isinstance(error.value, InputError) and "\n" not in str(error.value)


def test_a_model_prepared_with_kernels_is_refused_and_certifier_prepare_is_accepted():
    build, side = NETWORKS["convnet"]
    model = build().eval()
    x = torch.rand(2, 1, side, side)
    family = random_family(side, (3,), 0)
    certifier = SubspaceCertifier(upper="none", steps=4)
    with pytest.raises(ValueError, match="plain"):
        certifier(prepare_model(model, "cpu", F64, kernels=["fast_maxpool"]), x, family)
    prepared = certifier.prepare(model)
    assert torch.equal(certifier(prepared, x, family).margins, certifier(model, x, family).margins)


@pytest.mark.parametrize("method", ["alpha-crown", "bab"])
def test_a_tighter_mode_is_never_looser_than_crown(method):
    """At every radius a mode's bound is at least CROWN's; the searches differ, so radii agree to the search's
    tolerance (rtol) at worst, and the mode gains on the median."""
    build, side = NETWORKS["convnet"]
    torch.manual_seed(7)
    model = build().to(F64).eval()
    family = random_family(side, (4, 4), seed=8)
    x = torch.rand(5, 1, side, side, dtype=F64)
    crown = SubspaceCertifier(upper="deepfool", steps=10)(model, x, family)
    tighter = SubspaceCertifier(method=method, upper="deepfool", steps=10)(model, x, family)
    assert (tighter.margins >= crown.margins * (1 - 1e-2)).all()
    assert tighter.margins.median() > crown.margins.median()


# ---- a trained LeNet ----------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_on_a_trained_lenet_certified_bounds_lie_below_both_attacks_and_modes_tighten(mnist_root):
    """LeNet after 200 SGD steps on real MNIST, 3 test images x 3 DCT subspaces (low, middle, high): every
    certified bound is at most FMN's and DeepFool's margin on rows where they changed the label, FMN is at most
    DeepFool on most of them, and alpha-CROWN and branch and bound are at least CROWN (to the search's rtol)."""
    from datamodules.mnist import read_mnist, resolve_mnist_root
    from models import build_model

    root = resolve_mnist_root(mnist_root)
    train_images, train_labels = read_mnist(root, True)
    test_images, _ = read_mnist(root, False)
    torch.manual_seed(0)
    model = NormalizedModel(Normalize(0.1307, 0.3081, (1, 28, 28)), build_model("lenet"))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(200):
        batch = torch.randint(0, train_images.shape[0], (64,))
        images = train_images[batch].unsqueeze(1).float() / 255.0
        loss = nn.functional.cross_entropy(model(images), train_labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    x = test_images[:3].unsqueeze(1).float() / 255.0
    family = DCTBlockSubspaces((1, 28, 28), 8, 1)
    samples, subspaces = torch.arange(3).repeat(3), torch.tensor([0, 10, 20]).repeat_interleave(3)
    fmn = SubspaceFMN(dtype=F64).attack_rows(model, x, family, samples, subspaces)
    deepfool = SubspaceDeepFool(dtype=F64).attack_rows(model, x, family, samples, subspaces)
    settings = {"crown": {}, "alpha-crown": {"alpha_steps": 10}, "bab": {"bab_domains": 8}}
    results = {
        m: SubspaceCertifier(method=m, **s).attack_rows(model, x, family, samples, subspaces)
        for m, s in settings.items()
    }
    both = fmn.converged & deepfool.converged
    assert both.sum() >= 7
    assert (fmn.margins[both] <= deepfool.margins[both]).float().mean() >= 0.9
    for method, result in results.items():
        assert (result.margins > 0).all(), method
        assert (result.margins[fmn.converged] <= fmn.margins[fmn.converged]).all(), method
        assert (result.margins[deepfool.converged] <= deepfool.margins[deepfool.converged]).all(), method
        assert (result.margins >= results["crown"].margins * (1 - 1e-2)).all(), method
