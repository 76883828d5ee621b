"""L2 PGD (MadryLab conventions) with ball-then-box, exact and Dykstra projections, on a tiny trained network.

Independent references (tests/test_dykstra.py): the KKT bisection for the exact projection, the ball's closed form
and a dense flip matrix from scipy.fft; the MadryLab step loop written out per sample.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.dykstra import project_box
from attacks.pgd import L2PGD
from frequency.transforms import flip
from tests.test_dykstra import ball_closed_form, dense_flip, kkt_flipped_or_plain

SHAPE = (1, 8, 8)
NUM_CLASSES = 3
MODES = [
    ("ball_box", False),
    ("exact", False),
    ("dykstra", False),
    ("ball_box", True),
    ("exact", True),
    ("dykstra", True),
]


class FlipFirst(nn.Module):
    """`net(flip(x))`: the network of the original domain seen from the frequency-flipped representation."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(flip(x))


def _net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Dropout(0.2),
        nn.Linear(4 * 8 * 8, NUM_CLASSES),
    )


@pytest.fixture(scope="module")
def data_and_model():
    """Separable synthetic images in [0, 1] (class prototype + noise) and a small conv net trained on them."""
    g = torch.Generator().manual_seed(123)
    prototypes = 0.2 + 0.6 * torch.rand((NUM_CLASSES, *SHAPE), generator=g)
    y = torch.arange(96) % NUM_CLASSES
    x = (prototypes[y] + 0.1 * torch.randn((96, *SHAPE), generator=g)).clamp(0, 1)
    torch.manual_seed(0)
    net = _net()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(60):
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    net.eval()
    assert (net(x).argmax(1) == y).float().mean() > 0.9
    return x[:24], y[:24], net


def _setup(data_and_model, flipped: bool):
    x, y, net = data_and_model
    return (flip(x), y, FlipFirst(net)) if flipped else (x, y, net)


def _losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("projection, flipped", MODES)
def test_pgd_raises_loss_beyond_random_noise(data_and_model, projection, flipped):
    x, y, model = _setup(data_and_model, flipped)
    eps = 1.0
    attack = L2PGD(eps, steps=7, projection=projection, flipped=flipped)
    x_adv = attack(model, x, y, generator=torch.Generator().manual_seed(0))
    clean, adv = _losses(model, x, y), _losses(model, x_adv, y)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    x_rand = attack.projection(x + eps * noise / noise.flatten(1).norm(dim=1).view(-1, 1, 1, 1), x, eps)
    rand = _losses(model, x_rand, y)
    assert (adv > clean).float().mean() >= 0.9
    assert adv.mean() > clean.mean() + 0.5
    assert adv.mean() > rand.mean() + 0.5
    acc_clean = (model(x).argmax(1) == y).float().mean()
    acc_adv = (model(x_adv).argmax(1) == y).float().mean()
    assert acc_adv < acc_clean


@pytest.mark.parametrize("projection, flipped", MODES)
def test_pgd_respects_ball_and_validity(data_and_model, projection, flipped):
    x, y, model = _setup(data_and_model, flipped)
    eps = 1.5
    x_adv = L2PGD(eps, steps=5, projection=projection, flipped=flipped)(model, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert ((x_adv - x).flatten(1).norm(dim=1) <= eps + 5e-7).all()  # measured excess <= 1.2e-7 (float32)
    pixels = dense_flip(x_adv) if flipped else x_adv  # reference: the dense scipy flip
    outside = max(-pixels.min().item(), pixels.max().item() - 1)
    assert outside <= (1e-6 if projection == "exact" else 1e-7)  # measured: exact (float32 flips) 1.2e-7, else 2.6e-8
    if not flipped:  # the plain box is exact: clamping leaves no rounding error
        assert x_adv.min() >= 0 and x_adv.max() <= 1


@pytest.mark.parametrize("projection", ["exact", "dykstra"])
def test_exact_modes_iterates_are_exact_projections(data_and_model, projection):
    """One step from the clean input: the result is the exact projection of `x + a g/||g||`, which the naive
    ball-then-box answer is not (it is strictly farther from the unprojected step, or equal where both agree)."""
    x, y, model = _setup(data_and_model, flipped=True)
    eps, a = 1.0, 3.0  # long step: lands outside the ball and the box
    out = L2PGD(eps, steps=1, step_size=a, random_start=False, projection=projection, flipped=True)(model, x, y)
    naive = L2PGD(eps, steps=1, step_size=a, random_start=False, projection="ball_box", flipped=True)(model, x, y)
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    z = (x + a * g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)).double()
    exact = kkt_flipped_or_plain(z, x.double(), eps, flipped=True)  # KKT bisection, dense scipy flip
    naive_ref = dense_flip(dense_flip(ball_closed_form(z, x.double(), eps)).clamp(0, 1))
    torch.testing.assert_close(out.double(), exact, atol=5e-7, rtol=0)  # measured 1.5e-7 (float32 iterates)
    torch.testing.assert_close(naive.double(), naive_ref, atol=5e-7, rtol=0)  # measured 1.0e-7
    out, naive, z = out.double(), naive.double(), z
    d_out, d_naive = (out - z).flatten(1).norm(dim=1), (naive - z).flatten(1).norm(dim=1)
    assert (d_out <= d_naive + 1e-5).all() and (d_out < d_naive - 1e-3).any()


def test_flipped_attack_is_the_flip_of_the_original_domain_attack(data_and_model):
    """flip is orthogonal: PGD on flip(x) against net∘flip with the rotated box equals flip of PGD on x (float64)."""
    x, y, net = data_and_model
    net64 = copy.deepcopy(net).double()
    x64 = x.double()
    for projection in ("ball_box", "exact", "dykstra"):
        kwargs = dict(steps=4, random_start=False, projection=projection, dykstra_tol=1e-10)
        plain = L2PGD(1.0, **kwargs)(net64, x64, y)
        flipped = L2PGD(1.0, flipped=True, **kwargs)(FlipFirst(net64), flip(x64), y)
        torch.testing.assert_close(flip(flipped), plain, atol=1e-6, rtol=0)


def test_pgd_steps_follow_madrylab_convention(data_and_model):
    """Reference loop: start on the eps sphere, steps x + a g/||g||, ball projection after each step."""
    x, y, model = data_and_model
    eps, steps = 0.8, 3
    attack = L2PGD(eps, steps=steps, projection="ball")
    assert attack.step_size == pytest.approx(2.5 * eps / steps)
    x_adv = attack(model, x, y, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    for i in range(x.shape[0]):  # one sample at a time, straightforward formulas
        xi, yi = x[i : i + 1], y[i : i + 1]
        cur = xi + eps * noise[i : i + 1] / noise[i].norm()
        for _ in range(steps):
            cur = cur.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(model(cur), yi), cur)
            cur = cur.detach() + attack.step_size * g / g.norm()
            delta = cur - xi
            cur = xi + delta * min(1.0, eps / delta.norm().item())
        torch.testing.assert_close(x_adv[i : i + 1], cur, atol=1e-5, rtol=0)


def test_random_start_lies_on_the_sphere_and_is_seeded(data_and_model):
    x, y, model = data_and_model
    start = L2PGD(0.7, steps=0, projection="ball")(model, x, y, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close((start - x).flatten(1).norm(dim=1), torch.full((x.shape[0],), 0.7))
    attack = L2PGD(1.0, steps=3, projection="dykstra")
    a = attack(model, x, y, generator=torch.Generator().manual_seed(7))
    b = attack(model, x, y, generator=torch.Generator().manual_seed(7))
    c = attack(model, x, y, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    seeded = L2PGD(1.0, steps=3, projection="dykstra", generator=torch.Generator().manual_seed(7))
    assert torch.equal(seeded(model, x, y), a)


def test_model_flags_buffers_and_grads_untouched(data_and_model):
    x, y, net = data_and_model
    model = copy.deepcopy(net)
    model.train()
    model[4].eval()  # a dropout left in eval on purpose: its own flag must come back
    flags = [m.training for m in model.modules()]
    bn_stats = [b.clone() for b in model.buffers()]
    for projection, flipped in MODES:
        xs, m = (flip(x), FlipFirst(model)) if flipped else (x, model)
        L2PGD(1.0, steps=2, projection=projection, flipped=flipped)(m, xs, y)
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(a, b) for a, b in zip(bn_stats, model.buffers()))
    assert all(p.grad is None for p in model.parameters())


def _exposed(model: nn.Module) -> tuple[list, list, dict]:
    """What code holding the model sees of it: own attributes shadowing `forward`, hooks, the state dict."""
    shadows = ["forward" in vars(m) for m in model.modules()]
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()]
    return shadows, hooks, {k: v.clone() for k, v in model.state_dict().items()}


def test_the_callers_model_is_the_same_during_and_after_the_attack(data_and_model):
    """The native stem gradient (a 1-channel stem on the CPU) reaches the live model without patching it: during
    the attack (seen from the loss, which runs between forward and backward passes) and after it."""
    x, y, model = data_and_model
    before, seen = _exposed(model), []

    def loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.append(_exposed(model))
        return F.cross_entropy(logits, labels, reduction="none")

    L2PGD(1.0, steps=3, loss=loss)(model, x, y)
    assert len(seen) == 3
    for state in (*seen, _exposed(model)):
        assert state[:2] == before[:2] and not any(state[0])
        assert state[2].keys() == before[2].keys() and all(torch.equal(state[2][k], v) for k, v in before[2].items())
    assert type(model[0]).forward is nn.Conv2d.forward


def test_native_stem_gradients_change_nothing_but_rounding(data_and_model):
    x, y, net = data_and_model
    model, x = copy.deepcopy(net).double(), x.double()
    native = L2PGD(1.0, steps=4, native_stem_grad=True)(model, x, y, generator=torch.Generator().manual_seed(4))
    plain = L2PGD(1.0, steps=4, native_stem_grad=False)(model, x, y, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(native, plain, rtol=1e-10, atol=1e-12)


def test_eval_mode_makes_the_attack_deterministic_despite_dropout(data_and_model):
    """With the model in train mode, dropout would randomise gradients; the attack runs in eval mode."""
    x, y, net = data_and_model
    model = copy.deepcopy(net).train()
    attack = L2PGD(1.0, steps=3, random_start=False)
    torch.manual_seed(0)
    a = attack(model, x, y)
    torch.manual_seed(1)
    b = attack(model, x, y)
    assert torch.equal(a, b)
    torch.testing.assert_close(a, attack(model.eval(), x, y))


@pytest.mark.parametrize("context", [torch.inference_mode, torch.no_grad])
def test_works_under_inference_mode_and_no_grad(data_and_model, context):
    x, y, model = _setup(data_and_model, flipped=True)
    attack = L2PGD(1.0, steps=3, projection="dykstra", flipped=True)
    expected = attack(model, x, y, generator=torch.Generator().manual_seed(3))
    with context():
        x_in, y_in = x.clone(), y.clone()  # inference tensors under inference_mode
        got = attack(model, x_in, y_in, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert _losses(model, got, y).mean() > _losses(model, x, y).mean()


def test_use_best_never_returns_a_lower_loss_than_the_last_iterate(data_and_model):
    x, y, model = data_and_model
    kwargs = dict(steps=5, step_size=1.5, projection="ball_box")  # large steps: loss is not monotone
    last = L2PGD(1.0, **kwargs)(model, x, y, generator=torch.Generator().manual_seed(2))
    best = L2PGD(1.0, use_best=True, **kwargs)(model, x, y, generator=torch.Generator().manual_seed(2))
    assert (_losses(model, best, y) >= _losses(model, last, y) - 1e-6).all()
    assert ((best - x).flatten(1).norm(dim=1) <= 1.0 + 1e-5).all()


def test_zero_gradient_gives_zero_step():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, NUM_CLASSES))
    nn.init.zeros_(model[1].weight)
    x = torch.rand(4, *SHAPE)
    y = torch.zeros(4, dtype=torch.long)
    x_adv = L2PGD(1.0, steps=3, random_start=False)(model, x, y)
    assert torch.equal(x_adv, x)


def test_eps_zero_returns_clean_input(data_and_model):
    x, y, model = data_and_model
    assert torch.equal(L2PGD(0.0, steps=3, projection="dykstra")(model, x, y), x)


def test_bad_inputs_raise(data_and_model):
    x, y, model = data_and_model
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        L2PGD(1.0)(model, (x - 0.5) / 0.25, y)  # normalised data passed by mistake
    with pytest.raises(ValueError, match="flip"):
        L2PGD(1.0, projection="dykstra", flipped=True)(FlipFirst(model), x + 2.0, y)
    L2PGD(1.0, projection="ball", steps=1)(model, (x - 0.5) / 0.25, y)  # no validity constraint: accepted
    with pytest.raises(ValueError, match="projection mode"):
        L2PGD(1.0, projection="linf")
    with pytest.raises(ValueError, match="labels|one label"):
        L2PGD(1.0)(model, x, y[:3])
    with pytest.raises(ValueError, match="per-sample"):
        L2PGD(1.0, loss=lambda logits, t: F.cross_entropy(logits, t))(model, x, y)


def test_custom_box_projection(data_and_model):
    x, y, model = data_and_model
    x_mid = 0.3 + 0.4 * x  # inside [0.3, 0.7]
    attack = L2PGD(2.0, steps=3, projection="dykstra", box=lambda z: project_box(z, 0.3, 0.7))
    x_adv = attack(model, x_mid, y)
    assert x_adv.min() >= 0.3 and x_adv.max() <= 0.7
    assert ((x_adv - x_mid).flatten(1).norm(dim=1) <= 2.0 + 1e-5).all()
