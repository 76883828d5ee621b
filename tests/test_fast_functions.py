"""The attack's batch-norm and max-pool paths (attacks/fast_functions.py) give PyTorch's own values and gradients,
bit for bit, and leave every call they do not cover to PyTorch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.fast_functions import CHANNELS_LAST_POOL, _FastFunctions, fast_functions, strided_max_pool2d


def batchnorm(channels: int, dtype: torch.dtype) -> nn.BatchNorm2d:
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(channels).to(dtype)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.01, 3)
        layer.weight.uniform_(-2, 2)
        layer.bias.uniform_(-1, 1)
    return layer.eval()


def value_and_input_gradient(layer: nn.Module, x: torch.Tensor, seed: torch.Tensor, fast: bool):
    point = x.detach().clone().requires_grad_(True)
    with fast_functions(batchnorm=fast, maxpool=fast):
        out = layer(point)
        (grad,) = torch.autograd.grad(out, point, seed)
    return out.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_eval_batch_norm_gradient_is_bit_identical_to_pytorch(dtype, channels_last, affine):
    layer = batchnorm(7, dtype)
    if not affine:
        layer.weight, layer.bias = None, None
    x = torch.randn(5, 7, 9, 11, dtype=dtype)
    seed = torch.randn(5, 7, 9, 11, dtype=dtype)
    if channels_last:
        x, seed = x.contiguous(memory_format=torch.channels_last), seed.contiguous(memory_format=torch.channels_last)
    plain = value_and_input_gradient(layer, x, seed, fast=False)
    fast = value_and_input_gradient(layer, x, seed, fast=True)
    assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1], plain[1])


def test_eval_batch_norm_path_is_taken_and_training_mode_is_left_to_pytorch():
    layer, x = batchnorm(4, torch.float32), torch.randn(6, 4, 5, 5, requires_grad=True)
    with fast_functions(batchnorm=True, maxpool=False):
        assert type(layer(x).grad_fn).__name__ == "_EvalBatchNormBackward"
        layer.train()
        before = layer.running_mean.clone()
        out = layer(x)
        assert type(out.grad_fn).__name__ != "_EvalBatchNormBackward"
        assert not torch.equal(layer.running_mean, before)  # PyTorch's training path updated the statistics
        torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(4) + layer.bias, atol=1e-5, rtol=0)


POOLS = [  # channels, size, kernel, stride, padding
    (CHANNELS_LAST_POOL, 12, 3, 2, 1),  # ResNet's stem pool on a wide map: channels-last path
    (32, 9, 2, 2, 0),
    (CHANNELS_LAST_POOL + 4, 8, (3, 2), (1, 2), (1, 0)),
    (6, 12, 2, None, 0),  # LeNet's narrow maps: strided maxima without gradient, PyTorch's kernel with one
    (3, 11, 3, 2, 1),
    (1, 7, (2, 3), (2, 1), (0, 1)),
]


def pool_inputs(channels: int, size: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(channels + size)
    x = torch.randn(4, channels, size, size, dtype=dtype)
    x[:, :, 1::3, ::2] = x[:, :, :1, :1]  # ties: PyTorch's first-maximum rule must hold
    return x, torch.randn_like(x)


@pytest.mark.parametrize("channels,size,kernel,stride,padding", POOLS)
def test_max_pool_values_and_gradients_are_bit_identical_to_pytorch(channels, size, kernel, stride, padding):
    x, _ = pool_inputs(channels, size)
    layer = nn.MaxPool2d(kernel, stride, padding)
    expected = layer(x)
    seed = torch.randn_like(expected)
    plain = value_and_input_gradient(layer, x, seed, fast=False)
    fast = value_and_input_gradient(layer, x, seed, fast=True)
    assert torch.equal(fast[0], expected) and torch.equal(fast[1], plain[1])
    with torch.no_grad(), fast_functions(batchnorm=False, maxpool=True):
        assert torch.equal(layer(x), expected)  # the label-check path
    assert torch.equal(
        strided_max_pool2d(x, *(nn.modules.utils._pair(v) for v in (kernel, stride or kernel, padding))), expected
    )


def test_strided_max_pool_propagates_nan_like_pytorch():
    x, _ = pool_inputs(3, 8)
    x[0, 1, 2, 3] = float("nan")
    expected = F.max_pool2d(x, 2)
    got = strided_max_pool2d(x, (2, 2), (2, 2), (0, 0))
    assert torch.equal(got.isnan(), expected.isnan()) and got.isnan().sum() == 1
    assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_wide_max_pool_gradient_runs_in_channels_last_and_returns_channels_first():
    x = torch.randn(2, CHANNELS_LAST_POOL, 8, 8, requires_grad=True)
    with fast_functions(batchnorm=False, maxpool=True):
        out = F.max_pool2d(x, 2)
    assert type(out.grad_fn).__name__ == "_ChannelsLastMaxPoolBackward"
    assert out.is_contiguous()
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad.is_contiguous()


@pytest.mark.parametrize(
    "kwargs",
    [{"ceil_mode": True}, {"dilation": 2}, {"return_indices": True}],
    ids=["ceil_mode", "dilation", "return_indices"],
)
def test_max_pool_options_it_does_not_cover_run_pytorchs_own_kernel(kwargs):
    x = torch.randn(2, CHANNELS_LAST_POOL, 9, 9, requires_grad=True)
    expected = F.max_pool2d(x, 3, 2, **kwargs)
    with fast_functions(batchnorm=True, maxpool=True):
        got = F.max_pool2d(x, 3, 2, **kwargs)
    for a, b in zip(
        got if isinstance(got, tuple) else (got,), expected if isinstance(expected, tuple) else (expected,)
    ):
        assert torch.equal(a, b)
    assert type((got[0] if isinstance(got, tuple) else got).grad_fn).__name__.startswith("MaxPool2DWithIndices")


def test_under_batched_gradients_max_pool_keeps_pytorchs_gradient_path():
    x = torch.randn(2, CHANNELS_LAST_POOL, 8, 8, requires_grad=True)
    with fast_functions(batchnorm=True, maxpool=True, batched_backward=True):
        out = F.max_pool2d(x, 2)
        seeds = torch.randn(3, *out.shape)
        (grads,) = torch.autograd.grad(out, x, seeds, is_grads_batched=True)
    expected = torch.stack([torch.autograd.grad(F.max_pool2d(x, 2), x, s)[0] for s in seeds])
    assert torch.equal(grads, expected)


def test_the_mode_is_gone_after_the_block_even_when_it_raises():
    def active() -> bool:
        return any(isinstance(m, _FastFunctions) for m in torch.overrides._get_current_function_mode_stack())

    with fast_functions(batchnorm=True, maxpool=True):
        assert active()
    assert not active()
    with pytest.raises(RuntimeError, match="boom"), fast_functions(batchnorm=True, maxpool=True):
        raise RuntimeError("boom")
    assert not active()
    with fast_functions(batchnorm=False, maxpool=False):
        assert not active()  # nothing switched on: no mode at all


class ReluPool(nn.Module):
    """`max_pool2d(relu(h))`; with `reuse`, the ReLU's output also feeds a second branch."""

    def __init__(self, kernel, stride, padding, relu=F.relu, reuse: bool = False):
        super().__init__()
        self.pool, self.relu, self.reuse = (kernel, stride, padding), relu, reuse

    def forward(self, h):
        r = self.relu(h)
        pooled = F.max_pool2d(r, *self.pool)
        return (pooled.sum((2, 3)), r.mean((2, 3))) if self.reuse else pooled


@pytest.mark.parametrize("channels,size,kernel,stride,padding", POOLS)
@pytest.mark.parametrize("relu", [F.relu, torch.relu, nn.ReLU()], ids=["F.relu", "torch.relu", "nn.ReLU"])
def test_relu_then_pool_runs_as_pool_then_relu_with_pytorchs_values_and_gradients(
    channels, size, kernel, stride, padding, relu
):
    h, _ = pool_inputs(channels, size, torch.float64)
    h[:, :, ::4] = -h[:, :, ::4].abs()  # windows whose maxima are all negative
    model = ReluPool(kernel, stride, padding, relu)
    expected = model(h)
    seed = torch.randn_like(expected)
    plain = value_and_input_gradient(model, h, seed, fast=False)
    fast = value_and_input_gradient(model, h, seed, fast=True)
    assert torch.equal(fast[0], expected) and torch.equal(fast[1], plain[1])
    with fast_functions(batchnorm=False, maxpool=True):
        assert type(model(h.requires_grad_(True)).grad_fn).__name__ == "_PoolThenReluBackward"


def test_a_relu_output_used_elsewhere_still_gets_its_gradient():
    h, _ = pool_inputs(8, 12, torch.float64)
    model = ReluPool(2, 2, 0, reuse=True)

    def gradient(fast: bool) -> torch.Tensor:
        point = h.clone().requires_grad_(True)
        with fast_functions(batchnorm=False, maxpool=fast):
            pooled, mean = model(point)
            return torch.autograd.grad(pooled.sum() + 3 * mean.sum(), point)[0]

    torch.testing.assert_close(gradient(True), gradient(False), rtol=1e-14, atol=1e-14)


def test_inplace_relu_and_an_op_in_between_keep_the_plain_pool():
    h = torch.randn(2, 6, 8, 8, requires_grad=True)
    with fast_functions(batchnorm=False, maxpool=True):
        inplace = F.max_pool2d(F.relu(h.clone(), inplace=True), 2)
        in_between = F.max_pool2d(F.relu(h) * 1.0, 2)
    for out in (inplace, in_between):
        assert type(out.grad_fn).__name__ != "_PoolThenReluBackward"
        assert torch.equal(out, F.max_pool2d(F.relu(h), 2))
