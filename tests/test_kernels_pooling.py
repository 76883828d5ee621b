"""The engine's max-pool kernels (attacks/kernels/pooling.py) give PyTorch's own values and input gradients, bit for
bit, on their fast paths and on every call they leave to PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from attacks.kernels.pooling import CHANNELS_LAST_POOL, max_pool2d, max_pool2d_relu, strided_max_pool2d

DTYPES = [torch.float32, torch.float64]
POOLS = [  # channels, size, kernel, stride, padding
    (64, 12, 3, 2, 1),  # ResNet's stem pool: channels-last path
    (64, 8, (3, 2), (1, 2), (1, 0)),
    (CHANNELS_LAST_POOL, 9, 2, 2, 0),  # the narrowest map pooled in channels-last layout
    (CHANNELS_LAST_POOL - 1, 9, 2, 2, 0),  # the widest one that is not
    (6, 12, 2, None, 0),  # LeNet's maps: strided maxima without gradient, PyTorch's kernel with one
    (6, 11, 3, 2, 1),
    (6, 8, 2, (), 0),  # an empty stride means the kernel's, as in PyTorch
    (1, 7, (2, 3), (2, 1), (0, 1)),
]
POOL_IDS = [f"c{c}-s{s}-k{k}-st{st}-p{p}" for c, s, k, st, p in POOLS]


def same_bits(got: torch.Tensor, expected: torch.Tensor, zero_sign: bool = True) -> bool:
    """Equal dtype, shape and bits (NaN payloads included; the sign of zeros too unless `zero_sign` is False)."""
    if got.dtype != expected.dtype or got.shape != expected.shape:
        return False
    if not zero_sign and got.is_floating_point():
        got, expected = got + 0.0, expected + 0.0  # -0.0 + 0.0 == +0.0
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64}
    if got.dtype in as_int:
        return torch.equal(got.view(as_int[got.dtype]), expected.view(as_int[got.dtype]))
    return torch.equal(got, expected)


def pool_inputs(channels: int, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Three maps: coarse values (ties in most windows, PyTorch's first-maximum rule must hold; zeros of both
    signs), random values with rows of negative ones (windows whose maxima are all negative), random values."""
    torch.manual_seed(channels + size)
    x = torch.randn(3, channels, size, size, dtype=dtype)
    x[0] = torch.randint(-3, 4, (channels, size, size)).to(dtype) / 2
    x[0, :, ::3, ::2] *= -1  # 0.0 -> -0.0
    x[1, :, ::4] = -x[1, :, ::4].abs()
    return x


def value_and_gradient(function, x: torch.Tensor, seed: torch.Tensor | None = None):
    """`function(x)` and the gradient of `<seed, function(x)>` at x (seed: random of the output's shape)."""
    point = x.detach().clone().requires_grad_(True)
    out = function(point)
    seed = torch.randn_like(out) if seed is None else seed
    (grad,) = torch.autograd.grad(out, point, seed)
    return out, grad, seed


def check_like_pytorch(function, reference, x: torch.Tensor, zero_sign: bool = True) -> torch.Tensor:
    """`function` and `reference` give the same bits: values and input gradients, and values without a gradient
    (under no_grad and for an input that does not require one). `zero_sign` False: values with a gradient may
    differ in the sign of a zero (see the sign-of-zero test below). Returns the output with a
    gradient."""
    expected, expected_grad, seed = value_and_gradient(reference, x)
    out, grad, _ = value_and_gradient(function, x, seed)
    assert same_bits(out.detach(), expected.detach(), zero_sign) and same_bits(grad, expected_grad)
    with torch.no_grad():
        assert same_bits(function(x), expected.detach())  # the label check's path
    assert same_bits(function(x.detach()), expected.detach())  # grad mode on, no input gradient wanted
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels,size,kernel,stride,padding", POOLS, ids=POOL_IDS)
def test_max_pool_is_pytorchs_bit_for_bit(channels, size, kernel, stride, padding, dtype):
    x = pool_inputs(channels, size, dtype)
    out = check_like_pytorch(
        lambda t: max_pool2d(t, kernel, stride, padding), lambda t: F.max_pool2d(t, kernel, stride, padding), x
    )
    wide = channels >= CHANNELS_LAST_POOL
    assert type(out.grad_fn).__name__ == ("_ChannelsLastMaxPoolBackward" if wide else "MaxPool2DWithIndicesBackward0")
    assert out.is_contiguous()  # channels-first out of the channels-last path
    pairs = [(v, v) if isinstance(v, int) else tuple(v) for v in (kernel, stride or kernel, padding)]
    assert same_bits(strided_max_pool2d(x, *pairs), F.max_pool2d(x, kernel, stride, padding))


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels,size,kernel,stride,padding", POOLS, ids=POOL_IDS)
def test_pool_then_relu_is_pytorchs_relu_then_pool_bit_for_bit(channels, size, kernel, stride, padding, dtype, fast):
    h = pool_inputs(channels, size, dtype)
    out = check_like_pytorch(
        lambda t: max_pool2d_relu(t, kernel, stride, padding, fast=fast),
        lambda t: F.max_pool2d(F.relu(t), kernel, stride, padding),
        h,
        zero_sign=False,
    )
    assert type(out.grad_fn).__name__ == "_PoolThenReluBackward"
    assert (out == 0).any() and (out > 0).any()  # windows on both sides of the kink


@pytest.mark.parametrize("channels", [6, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates_like_pytorch(channels, dtype):
    x = pool_inputs(channels, 8, dtype)
    x[0, 1, 2, 3] = x[0, 1, 2, 2] = x[0, 1, 3, 2] = float("nan")  # three NaNs in one window
    x[1, 2, 0, 0] = float("nan")
    x[2, 3, 4:6, 4:6] = -x[2, 3, 4:6, 4:6].abs()
    x[2, 3, 4, 5] = float("nan")  # a NaN among negatives: relu(NaN) is NaN
    out = check_like_pytorch(lambda t: max_pool2d(t, 2), lambda t: F.max_pool2d(t, 2), x)
    assert out.isnan().sum() == 3
    merged = check_like_pytorch(
        lambda t: max_pool2d_relu(t, 2), lambda t: F.max_pool2d(F.relu(t), 2), x, zero_sign=False
    )
    assert merged.isnan().sum() == 3
    got = strided_max_pool2d(x, (2, 2), (2, 2), (0, 0))
    assert same_bits(got, F.max_pool2d(x, 2))


@pytest.mark.parametrize("channels", [6, 64])
def test_pool_then_relu_differs_from_pytorch_only_in_the_sign_of_a_zero_maximum(channels):
    """The one documented difference: a window whose maximum is -0.0 gives -0.0 (relu(-0.0)), PyTorch's
    max_pool2d(relu(h)) the first of its zeros, +0.0 here; equal as numbers, gradients bit-identical."""
    h = torch.tensor([[-1.0, -0.5], [-0.0, -2.0]], dtype=torch.float64).repeat(1, channels, 1, 1)
    out, grad, _ = value_and_gradient(lambda t: max_pool2d_relu(t, 2), h)
    expected, expected_grad, _ = value_and_gradient(lambda t: F.max_pool2d(F.relu(t), 2), h)
    assert torch.equal(out.detach(), expected.detach())  # equal as numbers: 0.0 == -0.0
    assert torch.signbit(out).all() and not torch.signbit(expected).any()
    assert same_bits(grad, expected_grad)


FALLBACKS = [{"ceil_mode": True}, {"dilation": 2}, {"return_indices": True}]


@pytest.mark.parametrize("merged", [False, True], ids=["max_pool2d", "max_pool2d_relu"])
@pytest.mark.parametrize("channels", [6, 64])
@pytest.mark.parametrize("kwargs", FALLBACKS, ids=["ceil_mode", "dilation", "return_indices"])
def test_options_the_fast_paths_do_not_cover_run_pytorchs_own_kernel(kwargs, channels, merged):
    x = pool_inputs(channels, 9, torch.float32)

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    if merged:
        function, reference = max_pool2d_relu, lambda t, *args, **kw: F.max_pool2d(F.relu(t), *args, **kw)
    else:
        function, reference = max_pool2d, F.max_pool2d
    check_like_pytorch(lambda t: first(function(t, 3, 2, **kwargs)), lambda t: first(reference(t, 3, 2, **kwargs)), x)
    out, expected = function(x.requires_grad_(True), 3, 2, **kwargs), reference(x, 3, 2, **kwargs)
    assert type(first(out).grad_fn).__name__ == "MaxPool2DWithIndicesBackward0"
    if kwargs.get("return_indices"):
        assert isinstance(out, tuple) and torch.equal(out[1], expected[1])


@pytest.mark.parametrize("channels", [6, 64])
@pytest.mark.parametrize("layout", ["channels_last", "strided"])
def test_channels_last_and_non_contiguous_inputs_give_pytorchs_bits(channels, layout):
    x = pool_inputs(channels, 12, torch.float64)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.transpose(2, 3)  # a strided view
    assert not x.is_contiguous()
    out = check_like_pytorch(lambda t: max_pool2d(t, 3, 2, 1), lambda t: F.max_pool2d(t, 3, 2, 1), x)
    assert type(out.grad_fn).__name__ == "MaxPool2DWithIndicesBackward0"  # PyTorch's own kernel
    merged = check_like_pytorch(lambda t: max_pool2d_relu(t, 3, 2, 1), lambda t: F.max_pool2d(F.relu(t), 3, 2, 1), x)
    assert type(merged.grad_fn).__name__ != "_PoolThenReluBackward"


def test_unbatched_and_integer_maps_are_left_to_pytorch():
    x = pool_inputs(64, 8, torch.float32)[0]  # [C, H, W]
    check_like_pytorch(lambda t: max_pool2d(t, 2), lambda t: F.max_pool2d(t, 2), x)
    check_like_pytorch(lambda t: max_pool2d_relu(t, 2), lambda t: F.max_pool2d(F.relu(t), 2), x)
    counts = torch.randint(-5, 9, (2, 64, 8, 8))
    assert torch.equal(max_pool2d(counts, 2), F.max_pool2d(counts, 2))
    assert torch.equal(max_pool2d_relu(counts, 2), F.max_pool2d(F.relu(counts), 2))


def test_wide_gradient_is_channels_first():
    x = torch.randn(2, CHANNELS_LAST_POOL, 8, 8, requires_grad=True)
    for function in (max_pool2d, max_pool2d_relu):
        out = function(x, 2)
        assert out.is_contiguous()
        (grad,) = torch.autograd.grad(out.sum(), x)
        assert grad.is_contiguous()
    with torch.no_grad():
        assert max_pool2d(x, 2).is_contiguous()
