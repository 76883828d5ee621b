"""The engine's convolution kernels (attacks/kernels/convolutions.py) change float rounding only, on a working
copy of the model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from attacks.deepfool import SubspaceDeepFool
from attacks.kernels import KERNELS
from attacks.kernels.convolutions import (
    STEM_CHANNELS,
    NativeStemGradients,
    is_plain_conv,
    patch_convolutions,
    unrolled_matrix,
)
from attacks.reference import dct_block_basis, reference_deepfool
from frequency import DCTBlockSubspaces

CPU64 = {"dtype": torch.float64, "device": torch.device("cpu")}  # CPU kernels


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
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation=dilation, bias=False).to(**CPU64)
    x = torch.randn(5, in_ch, size, size, **CPU64)
    matrix, out_shape = unrolled_matrix(conv, (in_ch, size, size), torch.float64, x.device)
    expected = nn.functional.conv2d(x, conv.weight, None, stride, padding, dilation)
    assert out_shape == tuple(expected.shape[1:])
    assert matrix.shape == (in_ch * size * size, expected[0].numel())
    torch.testing.assert_close((x.flatten(1) @ matrix).view_as(expected), expected, rtol=1e-12, atol=1e-12)
    # every entry is a weight copied or zero, never a computed value
    assert set(matrix.unique().tolist()) <= set(conv.weight.detach().flatten().tolist()) | {0.0}


def small_map_net() -> nn.Module:
    """A 1-channel stem (native input gradient on the CPU) and a 3x3 conv over a 2x2 map (unrolled)."""
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
        .to(**CPU64)
    )


def output_and_input_gradient(model: nn.Module, x: torch.Tensor, seed: torch.Tensor):
    point = x.clone().requires_grad_(True)
    out = model(point)
    (grad,) = torch.autograd.grad(out, point, seed)
    return out.detach(), grad


def backward_name(conv: nn.Module, x: torch.Tensor) -> str:
    return type(conv(x.clone().requires_grad_(True)).grad_fn).__name__


def test_patched_convolutions_give_the_same_outputs_and_input_gradients():
    model, x = small_map_net(), torch.rand(6, 1, 8, 8, **CPU64)
    seed = torch.randn(6, 10, **CPU64)
    plain = output_and_input_gradient(model, x, seed)
    work = copy.deepcopy(model)
    assert len(patch_convolutions(work, native_stem_grad=True, unroll_small=True)) == 2
    assert all("forward" in vars(work[i]) for i in (0, 3))  # both convolutions are patched, for good
    fast = output_and_input_gradient(work, x, seed)
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(fast[1], plain[1], rtol=1e-12, atol=1e-12)
    assert backward_name(work[0], x) == "_StemConvBackward"  # the stem: PyTorch's native input gradient
    h = torch.rand(6, 4, 2, 2, **CPU64)
    assert backward_name(work[3], h) == "AddBackward0"  # the 2x2 map: one matmul, then the bias
    assert not any("forward" in vars(m) for m in model.modules())  # the original is not patched
    assert backward_name(model[3], h) == "ConvolutionBackward0"
    assert len(patch_convolutions(work, native_stem_grad=True, unroll_small=True)) == 0  # already patched


@pytest.mark.parametrize("stem_grad,unroll", [(True, False), (False, True)])
def test_each_kernel_patches_only_its_convolutions(stem_grad, unroll):
    model, x, h = small_map_net(), torch.rand(3, 1, 8, 8, **CPU64), torch.rand(3, 4, 2, 2, **CPU64)
    work = copy.deepcopy(model)
    patch_convolutions(work, native_stem_grad=stem_grad, unroll_small=unroll)
    assert (backward_name(work[0], x) == "_StemConvBackward") == stem_grad
    assert (backward_name(work[3], h) == "AddBackward0") == unroll
    assert (backward_name(work[0], x) == "ConvolutionBackward0") == (not stem_grad)
    seed = torch.randn(3, 10, **CPU64)
    for got, expected in zip(
        output_and_input_gradient(work, x, seed), output_and_input_gradient(model, x, seed), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_no_kernel_patches_nothing():
    work = small_map_net()
    assert len(patch_convolutions(work, native_stem_grad=False, unroll_small=False)) == 0
    assert not any("forward" in vars(m) for m in work.modules())


def test_patched_convolutions_take_unbatched_and_channels_last_inputs():
    torch.manual_seed(2)
    conv = nn.Conv2d(STEM_CHANNELS, 5, 3, padding=1).to(**CPU64)
    work = copy.deepcopy(conv)
    patch_convolutions(work, native_stem_grad=True, unroll_small=True)
    x = torch.rand(3, STEM_CHANNELS, 6, 6, **CPU64)
    torch.testing.assert_close(work(x[0]), conv(x[0]), rtol=1e-12, atol=1e-12)  # [C, H, W]: the layer's own path
    last = x.contiguous(memory_format=torch.channels_last)
    seed = torch.randn(3, 5, 6, 6, **CPU64)
    for got, expected in zip(
        output_and_input_gradient(work, last, seed), output_and_input_gradient(conv, x, seed), strict=True
    ):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    wide = nn.Conv2d(STEM_CHANNELS + 1, 5, 3, padding=1).to(**CPU64)  # more than a stem's channels
    patch_convolutions(wide, native_stem_grad=True, unroll_small=False)
    assert backward_name(wide, torch.rand(2, STEM_CHANNELS + 1, 6, 6, **CPU64)) == "ConvolutionBackward0"


def test_engine_with_the_convolution_kernels_equals_the_per_sample_loop_in_float64():
    model, x = small_map_net(), torch.rand(4, 1, 8, 8, **CPU64)
    family = DCTBlockSubspaces((1, 8, 8), 4, 2)  # 3 subspaces
    attack = SubspaceDeepFool(batch_size=5, kernels=("native_stem_grad", "unroll_small_convs"))
    assert sum("forward" in vars(m) for m in attack.prepare(model).modules()) == 2
    result = attack(model, x, family)
    assert (result.iterations > 1).any()
    for s in range(len(family)):
        basis = dct_block_basis((1, 8, 8), 2 * s, 4).to(**CPU64)
        for n in range(len(x)):
            pert, iterations, converged = reference_deepfool(model, x[n], basis)
            assert result.margins[s, n].item() == pytest.approx(pert.norm().item(), rel=1e-10)
            assert result.iterations[s, n].item() == iterations and result.converged[s, n].item() == converged


@pytest.mark.parametrize("dropped", ["native_stem_grad", "unroll_small_convs"])
def test_switching_a_convolution_kernel_off_changes_nothing_but_rounding(dropped):
    model, x = small_map_net(), torch.rand(5, 1, 8, 8, **CPU64)
    family = DCTBlockSubspaces((1, 8, 8), 4, 2)
    base = SubspaceDeepFool(batch_size=4)(model, x, family)
    other = SubspaceDeepFool(batch_size=4, kernels=[k for k in KERNELS if k != dropped])(model, x, family)
    torch.testing.assert_close(other.margins, base.margins, rtol=1e-10, atol=0)
    assert torch.equal(other.iterations, base.iterations) and torch.equal(other.converged, base.converged)


class StandardisedConv(nn.Conv2d):
    """A convolution with its own forward (weight standardisation, as in BiT): must never be patched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = (self.weight - self.weight.mean()) / self.weight.std()
        return self._conv_forward(x, weight, self.bias)


def test_convolutions_that_are_not_plain_are_left_alone():
    torch.manual_seed(2)
    model = nn.Sequential(StandardisedConv(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4, 10)).to(**CPU64)
    x = torch.rand(3, 1, 1, 1, **CPU64)  # a 1x1 map: a plain Conv2d here would be unrolled
    plain = model(x)
    work = copy.deepcopy(model)
    assert len(patch_convolutions(work, native_stem_grad=True, unroll_small=True)) == 0
    assert "forward" not in vars(work[0])
    assert torch.equal(work(x), plain)
    assert not is_plain_conv(StandardisedConv(1, 4, 3))
    assert not is_plain_conv(nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"))
    assert not is_plain_conv(nn.Conv2d(1, 4, 3, padding="same"))
    assert not is_plain_conv(nn.Conv1d(1, 4, 3))
    assert is_plain_conv(nn.Conv2d(1, 4, 3, padding=1))


def _model_state(model: nn.Module) -> tuple:
    """What a live model exposes: per-module own attributes that shadow methods, hooks, and the state dict."""
    shadows = [sorted(k for k in vars(m) if k == "forward") for m in model.modules()]
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()]
    return shadows, hooks, {k: v.clone() for k, v in model.state_dict().items()}


def test_native_stem_gradients_reroute_the_stems_convolutions_without_changing_the_model():
    model, x = small_map_net(), torch.rand(6, 1, 8, 8, **CPU64)
    seed = torch.randn(6, 10, **CPU64)
    before = _model_state(model)
    plain = output_and_input_gradient(model, x, seed)
    mode = NativeStemGradients(model)
    with mode:
        assert backward_name(model[0], x) == "_StemConvBackward"  # the 1-channel stem: native input gradient
        other = nn.Conv2d(1, 4, 3, padding=1).to(**CPU64)
        assert backward_name(other, x) == "ConvolutionBackward0"  # another model's stem: as it is
        assert backward_name(model[0], x[0]) == "SqueezeBackward1"  # unbatched [C, H, W]: the layer's own path
        during = _model_state(model)
    assert backward_name(model[0], x) == "ConvolutionBackward0"  # off again after the block
    with mode:  # the same mode again: the outputs and input gradients of the model as written
        point = x.clone().requires_grad_(True)
        out = model(point)
    (grad,) = torch.autograd.grad(out, point, seed)
    torch.testing.assert_close(out.detach(), plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, plain[1], rtol=1e-12, atol=1e-12)
    for state in (during, _model_state(model)):
        assert state[:2] == before[:2] and all(torch.equal(state[2][k], v) for k, v in before[2].items())
