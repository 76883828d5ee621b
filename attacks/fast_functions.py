"""Faster eval-mode batch norm and max-pooling while an attack runs: the same values and gradients, bit for bit.

DeepFool runs a frozen eval-mode model through nine input-gradient passes and one label check per step. Two of
PyTorch's CPU kernels are slow for that work (measured with `benchmarks/bench_deepfool.py`, 1 thread):

- eval-mode batch norm backward: the native kernel takes 6-9x longer than the per-channel multiply it amounts
  to (`grad * invstd * weight`). `_EvalBatchNorm` keeps the native forward and does that multiply, in the
  native kernel's order of operations, so the gradient is bit-identical.
- max-pooling on channels-first maps: 5-15x slower than on channels-last maps (ResNet's 3x3 stride-2 stem pool:
  15 ms against 1 ms for 100 images). Maps with at least `CHANNELS_LAST_POOL` channels are pooled in
  channels-last layout (PyTorch's own kernel, same first-maximum rule); the backward scatters with PyTorch's
  channels-first kernel and those indices (3.4 ms against 12-18 ms for a layout copy and the channels-last
  backward, 265 x 64 x 14 x 14 maps); a label check
  (no gradient) pools narrower maps with elementwise maxima of strided views. Values are exact either way.

`fast_functions(batchnorm=..., maxpool=...)` intercepts `F.batch_norm` and `F.max_pool2d` (so `nn.BatchNorm*`
and `nn.MaxPool2d` too) with a `TorchFunctionMode` inside the block; every other call, and every call these
paths do not cover (training-mode batch norm, `ceil_mode`, dilation, `return_indices`), runs unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

CHANNELS_LAST_POOL = 16  # max-pool maps with at least this many channels in channels-last layout (CPU)


@contextlib.contextmanager
def fast_functions(batchnorm: bool, maxpool: bool, batched_backward: bool = False) -> Iterator[None]:
    """Inside the block, eval-mode batch norm and max-pooling use the faster paths that are switched on.
    `batched_backward`: gradients will be taken with `is_grads_batched` (PyTorch's legacy vmap, which cannot
    run the channels-last max-pool backward), so max-pools that need a gradient keep PyTorch's own path."""
    if not (batchnorm or maxpool):
        yield
        return
    with _FastFunctions(batchnorm, maxpool, batched_backward):
        yield


class _FastFunctions(TorchFunctionMode):
    def __init__(self, batchnorm: bool, maxpool: bool, batched_backward: bool):
        super().__init__()
        self.batchnorm, self.maxpool, self.batched_backward = batchnorm, maxpool, batched_backward
        self.relu: tuple[torch.Tensor, torch.Tensor] | None = None  # (input, output) of the call just before

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        relu, self.relu = self.relu, None
        out = None
        if func is F.batch_norm and self.batchnorm:
            out = eval_batch_norm(*args, **kwargs)
        elif func is F.max_pool2d and self.maxpool:
            before = relu[0] if relu is not None and args and args[0] is relu[1] else None
            out = max_pool2d(*args, **kwargs, gradient_path=not self.batched_backward, relu_input=before)
        out = func(*args, **kwargs) if out is None else out
        if func in _RELUS and self.maxpool and not self.batched_backward and not kwargs.get("inplace", False):
            self.relu = (args[0], out) if len(args) == 1 and isinstance(out, torch.Tensor) else None
        return out


_RELUS = (F.relu, torch.relu)


def eval_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor | None:
    """`F.batch_norm` in eval mode with a cheap input-gradient backward (no weight or bias gradients); None where
    it does not apply (training mode, no running statistics, not on CPU, no gradient needed)."""
    if training or running_mean is None or running_var is None or input.dim() < 2 or input.device.type != "cpu":
        return None
    if not (torch.is_grad_enabled() and input.requires_grad):
        return None
    return _EvalBatchNorm.apply(input, running_mean, running_var, weight, bias, eps)


class _EvalBatchNorm(torch.autograd.Function):
    """Native eval-mode batch norm forward; backward `(grad * invstd) * weight` per channel, the native kernel's
    arithmetic (`invstd = rsqrt(var + eps)` in float64, rounded to the input dtype), so bits agree."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, eps):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        ctx.invstd = torch.rsqrt(running_var.double() + eps).to(x.dtype).view(shape)
        ctx.weight = None if weight is None else weight.detach().to(x.dtype).view(shape)
        return F.batch_norm(x, running_mean, running_var, weight, bias, False, 0.0, eps)

    @staticmethod
    def backward(ctx, grad):
        grad_input = grad * ctx.invstd
        if ctx.weight is not None:
            grad_input = grad_input * ctx.weight
        return grad_input, None, None, None, None, None


def max_pool2d(
    input: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode: bool = False,
    return_indices: bool = False,
    gradient_path: bool = True,
    relu_input: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """`F.max_pool2d` on a faster path, or None where none applies (indices asked for, `ceil_mode`, dilation,
    not a CPU batch of floating maps, or a map that needs a gradient and is narrow or `gradient_path` is off).
    `relu_input`: `input` is `relu(relu_input)`; with a gradient, the pool then runs on `relu_input` and the ReLU
    after it, on the 4x smaller pooled map (`_PoolThenRelu`)."""
    if return_indices or ceil_mode or input.dim() != 4 or input.device.type != "cpu":
        return None
    if not input.is_floating_point() or _pair(dilation) != (1, 1):
        return None
    kernel = _pair(kernel_size)
    stride = kernel if stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0) else _pair(stride)
    padding = _pair(padding)
    wide = input.shape[1] >= CHANNELS_LAST_POOL
    channels_last = input.is_contiguous(memory_format=torch.channels_last) and not input.is_contiguous()
    if torch.is_grad_enabled() and input.requires_grad:
        if gradient_path and relu_input is not None and relu_input.shape == input.shape and not channels_last:
            return _PoolThenRelu.apply(relu_input, kernel, stride, padding)
        fast = gradient_path and wide and not channels_last
        return _ChannelsLastMaxPool.apply(input, kernel, stride, padding) if fast else None
    if wide:
        if channels_last:
            return None  # PyTorch's own kernel is the channels-last one
        with torch.no_grad():
            pooled = F.max_pool2d(input.contiguous(memory_format=torch.channels_last), kernel, stride, padding)
        return pooled.contiguous()
    return strided_max_pool2d(input, kernel, stride, padding)


def strided_max_pool2d(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> torch.Tensor:
    """Max-pooling values as elementwise maxima of the kernel's strided views (no indices, no gradient):
    `x: [B, C, H, W]` -> `[B, C, H_out, W_out]`, the values of `F.max_pool2d` (NaN propagates)."""
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
    out_h, out_w = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    best = None
    with torch.no_grad():
        for i in range(kh):
            for j in range(kw):
                view = x[:, :, i : i + sh * (out_h - 1) + 1 : sh, j : j + sw * (out_w - 1) + 1 : sw]
                best = view.clone() if best is None else torch.maximum(best, view)
    return best


class _ChannelsLastMaxPool(torch.autograd.Function):
    """`F.max_pool2d` of a channels-first map: forward in channels-last layout (PyTorch's fast kernel there),
    backward with PyTorch's channels-first kernel and the same indices (plane offsets, layout-independent), which
    writes the channels-first gradient directly (no layout copy of the large input map)."""

    @staticmethod
    def forward(ctx, x, kernel, stride, padding):
        x_last = x.contiguous(memory_format=torch.channels_last)
        pooled, indices = torch.ops.aten.max_pool2d_with_indices(x_last, kernel, stride, padding, [1, 1], False)
        ctx.save_for_backward(x, indices.contiguous())
        ctx.pool = (kernel, stride, padding)
        return pooled.contiguous()

    @staticmethod
    def backward(ctx, grad):
        x, indices = ctx.saved_tensors
        kernel, stride, padding = ctx.pool
        grad_input = torch.ops.aten.max_pool2d_with_indices_backward(
            grad.contiguous(), x, kernel, stride, padding, [1, 1], False, indices
        )
        return grad_input, None, None, None


class _PoolThenRelu(torch.autograd.Function):
    """`max_pool2d(relu(h))` as `relu(max_pool2d(h))`: the same values (max and ReLU commute) and the same input
    gradient, bit for bit (a window's first maximum of `relu(h)` is that of `h` wherever it is positive, and the
    gradient is zero elsewhere), with the ReLU's forward and backward on the pooled map instead of the large one
    (LeNet's first ReLU: 6 x 28 x 28 -> 6 x 14 x 14). `h: [B, C, H, W]` channels-first."""

    @staticmethod
    def forward(ctx, h, kernel, stride, padding):
        source = h.contiguous(memory_format=torch.channels_last) if h.shape[1] >= CHANNELS_LAST_POOL else h
        pooled, indices = torch.ops.aten.max_pool2d_with_indices(source, kernel, stride, padding, [1, 1], False)
        out = torch.relu(pooled.contiguous())
        ctx.save_for_backward(h, indices.contiguous(), out)
        ctx.pool = (kernel, stride, padding)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, indices, out = ctx.saved_tensors
        kernel, stride, padding = ctx.pool
        grad = torch.ops.aten.threshold_backward(grad.contiguous(), out, 0)
        grad_h = torch.ops.aten.max_pool2d_with_indices_backward(
            grad, h, kernel, stride, padding, [1, 1], False, indices
        )
        return grad_h, None, None, None


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])
