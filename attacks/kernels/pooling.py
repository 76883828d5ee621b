"""Faster CPU max-pooling under attack: the values and gradients of `F.max_pool2d`, bit for bit (but one sign of zero).

DeepFool runs a frozen eval-mode model through nine input-gradient passes and one label check per step. PyTorch's
channels-first CPU max-pool kernels are slow for that work (`benchmarks/bench_deepfool.py`, docs/ENGINE.md):

- `max_pool2d` (`fast_maxpool`): maps with at least `CHANNELS_LAST_POOL` channels are pooled in channels-last
  layout (PyTorch's own kernel, same first-maximum rule; ResNet's 3x3 stride-2 stem pool: 1 ms against 15 ms for
  100 images); their backward scatters with PyTorch's channels-first kernel and those indices, which writes the
  channels-first gradient directly. A label check (no gradient) pools narrower maps with elementwise maxima of
  strided views.
- `max_pool2d_relu` (`pool_then_relu`): `max_pool2d(relu(h))` computed as `relu(max_pool2d(h))` when a gradient is
  needed, so the ReLU's forward and backward run on the pooled map (LeNet's first ReLU: 6x14x14 instead of
  6x28x28). Max and ReLU commute, and a window's first maximum of `relu(h)` is that of `h` wherever it is
  positive (the gradient is zero elsewhere).

Both take `F.max_pool2d`'s arguments and fall back to it wherever their paths do not apply (indices asked for,
`ceil_mode`, dilation, not a CPU batch of floating maps). `attacks/kernels/graph.py` puts them into the model's
graph in place of its max-pools.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHANNELS_LAST_POOL = 16  # max-pool maps with at least this many channels in channels-last layout


def max_pool2d(
    x: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False
) -> torch.Tensor:
    """`F.max_pool2d(x, ...)` on the faster path where one applies (module docstring)."""
    pool = _pool_arguments(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    if pool is None:
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    wide = x.shape[1] >= CHANNELS_LAST_POOL
    if torch.is_grad_enabled() and x.requires_grad:
        if wide and x.is_contiguous():
            return _ChannelsLastMaxPool.apply(x, *pool)
        return F.max_pool2d(x, kernel_size, stride, padding)
    if not wide:
        return strided_max_pool2d(x, *pool)
    if not x.is_contiguous():  # already channels-last (or strided): PyTorch's own kernel
        return F.max_pool2d(x, kernel_size, stride, padding)
    with torch.no_grad():
        return F.max_pool2d(x.contiguous(memory_format=torch.channels_last), *pool).contiguous()


def max_pool2d_relu(
    h: torch.Tensor,
    kernel_size,
    stride=None,
    padding=0,
    dilation=1,
    ceil_mode=False,
    return_indices=False,
    fast: bool = True,
) -> torch.Tensor:
    """`F.max_pool2d(F.relu(h), ...)` with the ReLU after the pool when a gradient is needed (module docstring);
    without one, `max_pool2d(relu(h))` (`fast`: on `max_pool2d`'s path, else PyTorch's)."""
    pool = _pool_arguments(h, kernel_size, stride, padding, dilation, ceil_mode, return_indices)
    if pool is not None and torch.is_grad_enabled() and h.requires_grad and h.is_contiguous():
        return _PoolThenRelu.apply(h, *pool, fast)
    pool_function = max_pool2d if fast else F.max_pool2d
    return pool_function(torch.relu(h), kernel_size, stride, padding, dilation, ceil_mode, return_indices)


def _pool_arguments(x: torch.Tensor, kernel_size, stride, padding, dilation, ceil_mode, return_indices):
    """`(kernel, stride, padding)` as pairs when the fast paths apply, else None."""
    if return_indices or ceil_mode or x.dim() != 4 or x.device.type != "cpu" or not x.is_floating_point():
        return None
    if _pair(dilation) != (1, 1):
        return None
    kernel = _pair(kernel_size)
    empty = stride is None or (isinstance(stride, (list, tuple)) and len(stride) == 0)
    return kernel, kernel if empty else _pair(stride), _pair(padding)


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
        pooled, indices = F.max_pool2d(x_last, kernel, stride, padding, return_indices=True)
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
    """`max_pool2d(relu(h))` as `relu(max_pool2d(h))`, `h: [B, C, H, W]` channels-first (module docstring); `fast`:
    wide maps pooled in channels-last layout."""

    @staticmethod
    def forward(ctx, h, kernel, stride, padding, fast):
        wide = fast and h.shape[1] >= CHANNELS_LAST_POOL
        source = h.contiguous(memory_format=torch.channels_last) if wide else h
        pooled, indices = F.max_pool2d(source, kernel, stride, padding, return_indices=True)
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
        return grad_h, None, None, None, None


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(value)
    return (value[0], value[0]) if len(value) == 1 else (value[0], value[1])
