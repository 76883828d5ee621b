"""The attack's faster convolution kernels (attacks/fast_convs.py) change float rounding only."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks.deepfool import SubspaceDeepFool
from attacks.fast_convs import _unrolled_matrix, fast_convolutions
from frequency import DCTBlockSubspaces
from tests.deepfool_reference import dct_block_basis, reference_deepfool

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F64 = {"dtype": torch.float64, "device": DEVICE}


@pytest.mark.parametrize(
    "in_ch,out_ch,size,kernel,stride,padding,dilation",
    [
        (3, 4, 1, 3, 1, 1, 1),  # 3x3 kernel over a 1x1 map: only the centre tap is used
        (3, 4, 2, 3, 1, 1, 1),
        (3, 5, 2, 3, 2, 1, 1),
        (2, 3, 3, 3, 1, 0, 1),
        (2, 3, 3, 5, 1, 2, 1),
        (2, 3, 4, 3, 1, 2, 2),
        (2, 2, 2, 1, 2, 0, 1),
        (2, 3, 3, (3, 1), 1, (1, 0), 1),
    ],
)
def test_unrolled_matrix_reproduces_conv2d(in_ch, out_ch, size, kernel, stride, padding, dilation):
    torch.manual_seed(0)
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation=dilation, bias=False).to(**F64)
    x = torch.randn(5, in_ch, size, size, **F64)
    matrix, out_shape = _unrolled_matrix(conv, (in_ch, size, size), torch.float64, x.device)
    expected = nn.functional.conv2d(x, conv.weight, None, stride, padding, dilation)
    assert out_shape == tuple(expected.shape[1:])
    assert matrix.shape == (in_ch * size * size, expected[0].numel())
    torch.testing.assert_close((x.flatten(1) @ matrix).view_as(expected), expected, rtol=1e-12, atol=1e-12)


def small_map_net() -> nn.Module:
    """A 1-channel stem (native input gradient on CPU) and a 3x3 conv over a 2x2 map (unrolled)."""
    torch.manual_seed(1)
    return (
        nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(4),  # 8x8 -> 2x2
            nn.Conv2d(4, 6, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(24, 10),
        )
        .eval()
        .to(**F64)
    )


def test_patched_convolutions_give_the_same_outputs_and_input_gradients():
    model, x = small_map_net(), torch.rand(6, 1, 8, 8, **F64)
    seed = torch.randn(6, 10, **F64)

    def output_and_gradient():
        point = x.clone().requires_grad_(True)
        out = model(point)
        (grad,) = torch.autograd.grad(out, point, seed)
        return out.detach(), grad

    plain = output_and_gradient()
    with fast_convolutions(model, stem_grad=True, unroll_small=True):
        assert all("forward" in vars(model[i]) for i in (0, 3))  # both convolutions are patched
        fast = output_and_gradient()
        assert model[3].forward.args[-1] and not model[0].forward.args[-1]  # only the 2x2-map conv is unrolled
    assert not any("forward" in vars(m) for m in model.modules())  # their own forward is back
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-12, atol=1e-12)


def test_forwards_are_restored_when_the_block_raises():
    model = small_map_net()
    with pytest.raises(RuntimeError, match="boom"), fast_convolutions(model, stem_grad=True, unroll_small=True):
        raise RuntimeError("boom")
    assert not any("forward" in vars(m) for m in model.modules())


def test_engine_with_fast_convolutions_equals_the_per_sample_loop_in_float64():
    model, x = small_map_net(), torch.rand(4, 1, 8, 8, **F64)
    family = DCTBlockSubspaces((1, 8, 8), 4, 2)  # 3 subspaces
    result = SubspaceDeepFool(batch_size=5)(model, x, family)
    assert (result.iterations > 1).any()
    for s in range(len(family)):
        basis = dct_block_basis((1, 8, 8), 2 * s, 4).to(**F64)
        for n in range(len(x)):
            pert, iterations, converged = reference_deepfool(model, x[n], basis)
            assert result.margins[s, n].item() == pytest.approx(pert.norm().item(), rel=1e-10)
            assert result.iterations[s, n].item() == iterations and result.converged[s, n].item() == converged


@pytest.mark.parametrize("kwargs", [{"native_stem_grad": False}, {"unroll_small_convs": False}])
def test_switching_a_kernel_off_changes_nothing_but_rounding(kwargs):
    model, x = small_map_net(), torch.rand(5, 1, 8, 8, **F64)
    family = DCTBlockSubspaces((1, 8, 8), 4, 2)
    base = SubspaceDeepFool(batch_size=4)(model, x, family)
    other = SubspaceDeepFool(batch_size=4, **kwargs)(model, x, family)
    torch.testing.assert_close(other.margins, base.margins, rtol=1e-10, atol=0)
    assert torch.equal(other.iterations, base.iterations)


class StandardisedConv(nn.Conv2d):
    """A convolution with its own forward (weight standardisation, as in BiT): must never be patched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean()) / self.weight.std()
        return self._conv_forward(x, weight, self.bias)


def test_convolutions_with_their_own_forward_are_left_alone():
    torch.manual_seed(2)
    model = nn.Sequential(StandardisedConv(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4, 10)).to(**F64)
    x = torch.rand(3, 1, 1, 1, **F64)  # a 1x1 map: a plain Conv2d here would be unrolled
    plain = model(x)
    with fast_convolutions(model, stem_grad=True, unroll_small=True):
        assert "forward" not in vars(model[0])
        torch.testing.assert_close(model(x), plain, rtol=0, atol=0)
