"""Faster CPU kernels for two kinds of convolution under attack (values equal up to float rounding).

DeepFool needs only input gradients, nine per step, through a frozen eval-mode model; two kinds of convolution
waste most of that time on a CPU (measured with `benchmarks/bench_deepfool.py`, docs/ENGINE.md):

- image stems, convolutions reading at most `STEM_CHANNELS` channels (LeNet's and ResNet's `conv1`): oneDNN's
  backward-data kernel is 2-5x slower than PyTorch's native one for so few channels. Their input gradient comes
  from the native kernel (`native_stem_grad`).
- convolutions over an input no larger than the kernel (ResNet-18's last stages on 28x28 MNIST run 3x3 kernels
  over 2x2 and 1x1 maps): most of their multiply-adds hit zero padding. Such a convolution is a fixed linear map
  of the flattened input; it runs as one matmul with the unrolled matrix `[C*H*W, C_out*H_out*W_out]`, copied from
  the weights once per input shape (`unroll_small_convs`).

`patch_convolutions(model, native_stem_grad, unroll_small)` replaces the `forward` of the plain `nn.Conv2d`
layers of a working copy of the model (never the caller's). Patched layers give their weights no gradient.
`NativeStemGradients(model)` gives a live model's stems the native input gradient without changing the model: a
torch function mode that reroutes their convolutions while it is on (L2 PGD during training).

The native kernel is picked by switching oneDNN off (`torch.backends.mkldnn.enabled`, a process-wide switch: no
thread-local one exists) around the one backward-data call, and back on in `finally`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

STEM_CHANNELS = 4  # convolutions reading at most this many channels count as the image stem


def patch_convolutions(model: nn.Module, native_stem_grad: bool, unroll_small: bool) -> list[nn.Conv2d]:
    """Give `model`'s plain `nn.Conv2d` layers (zero padding, numeric padding) the kernels switched on, for good;
    returns the patched layers."""
    if not (native_stem_grad or unroll_small):
        return []
    patched = []
    for module in model.modules():
        if is_plain_conv(module) and "forward" not in vars(module):
            module.forward = functools.partial(_forward, module, native_stem_grad, unroll_small, {})
            patched.append(module)
    return patched


class NativeStemGradients(TorchFunctionMode):
    """While on (`with NativeStemGradients(model):`, this thread only), the image-stem convolutions of `model` (plain
    `nn.Conv2d` reading at most `STEM_CHANNELS` channels, on CPU batches) take their input gradient from PyTorch's
    native kernel and give their weights no gradient; everything else runs as it is. For attacks on a live model
    (L2 PGD during training), which cannot work on a prepared copy: the model itself is never changed. Turn it on
    around forward passes only: it sees every torch call made while it is on. `weights`: the ids of the stems'
    weights (empty: nothing to reroute)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        stems = (m for m in model.modules() if is_plain_conv(m) and m.in_channels <= STEM_CHANNELS)
        self.weights = {id(conv.weight) for conv in stems}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.conv2d and self.weights:
            call = _conv_call(args, kwargs)
            x, weight, padding = call[0], call[1], call[4]
            if id(weight) in self.weights and x.dim() == 4 and x.device.type == "cpu" and not isinstance(padding, str):
                return _StemConv.apply(*call)
        return func(*args, **kwargs)


_CONV_ARGUMENTS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)


def _conv_call(args: tuple, kwargs: dict) -> tuple:
    """`F.conv2d`'s arguments in order, defaults filled in."""
    values = dict(zip(_CONV_ARGUMENTS, _CONV_DEFAULTS, strict=True))
    values.update(zip(_CONV_ARGUMENTS, args))
    values.update(kwargs)
    return tuple(values[name] for name in _CONV_ARGUMENTS)


def is_plain_conv(module: nn.Module) -> bool:
    """A plain convolution: `nn.Conv2d`'s own forward (a subclass may transform its weight, e.g. standardise it)."""
    return (
        isinstance(module, nn.Conv2d)
        and type(module).forward is nn.Conv2d.forward
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _forward(conv: nn.Conv2d, stem_grad: bool, unroll_small: bool, matrices: dict, x: torch.Tensor) -> torch.Tensor:
    call = (x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    if x.dim() != 4:  # unbatched input: the layer's own path (a plain convolution: zero padding)
        return F.conv2d(*call)
    if unroll_small and _is_small(conv, x):
        return _unrolled(conv, x, matrices)
    if stem_grad and conv.in_channels <= STEM_CHANNELS and x.device.type == "cpu":
        return _StemConv.apply(*call)
    return F.conv2d(*call)


def _is_small(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """The unrolled matmul costs no more multiply-adds than the convolution: input map no larger than the kernel."""
    kernel_h, kernel_w = conv.kernel_size
    return conv.groups == 1 and x.shape[-2] * x.shape[-1] <= kernel_h * kernel_w


def _unrolled(conv: nn.Conv2d, x: torch.Tensor, matrices: dict) -> torch.Tensor:
    """`conv(x)` as `x.flatten(1) @ M + bias`, `M` built once per (shape, dtype, device) from the weights."""
    key = (tuple(x.shape[1:]), x.dtype, x.device)
    if key not in matrices:
        matrices[key] = unrolled_matrix(conv, key[0], x.dtype, x.device)
    matrix, out_shape = matrices[key]
    y = (x.flatten(1) @ matrix).view(-1, *out_shape)
    return y if conv.bias is None else y + conv.bias.view(-1, 1, 1)


def unrolled_matrix(
    conv: nn.Conv2d, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """`M: [C*H*W, C_out*H_out*W_out]` with `conv(x) = x.flatten(1) @ M` (no bias), and `(C_out, H_out, W_out)`.
    Entry ((c, i, j), (o, p, q)) is the weight `W[o, c, a, b]` that links input pixel (i, j) to output pixel
    (p, q), or zero: copied, never computed, so `M` is exact."""
    _, height, width = shape
    taps_h, valid_h = _taps(height, conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0], device)
    taps_w, valid_w = _taps(width, conv.kernel_size[1], conv.stride[1], conv.padding[1], conv.dilation[1], device)
    weight = conv.weight.detach().to(dtype)
    blocks = weight[:, :, taps_h[:, :, None, None], taps_w[None, None, :, :]]  # [O, C, H, H_out, W, W_out]
    blocks = blocks * (valid_h[:, :, None, None] & valid_w[None, None, :, :]).to(dtype)
    matrix = blocks.permute(1, 2, 4, 0, 3, 5)  # [C, H, W, O, H_out, W_out]
    out_shape = (weight.shape[0], taps_h.shape[1], taps_w.shape[1])
    return matrix.reshape(shape[0] * height * width, -1).contiguous(), out_shape


def _taps(size: int, kernel: int, stride: int, padding: int, dilation: int, device: torch.device):
    """Along one axis: the kernel tap linking input i to output p, `[size, size_out]` long, and whether it exists."""
    size_out = (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
    offset = torch.arange(size, device=device)[:, None] + padding - stride * torch.arange(size_out, device=device)
    valid = (offset >= 0) & (offset % dilation == 0) & (offset // dilation < kernel)
    return (offset // dilation).clamp(0, kernel - 1), valid


class _StemConv(torch.autograd.Function):
    """`F.conv2d` whose backward returns only the input gradient, from the native (non-oneDNN) CPU kernel."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(x, weight)
        ctx.conv = (stride, padding, dilation, groups)
        return nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        grad_input = None
        if ctx.needs_input_grad[0]:
            # under autocast the forward ran in low precision: the gradient comes in the input's dtype
            grad_output, x, weight = (
                grad_output.to(x.dtype).contiguous(),
                x.contiguous(),
                weight.to(x.dtype).contiguous(),
            )
            with _onednn_off():  # the native kernel wants contiguous (not channels-last) tensors
                grad_input = torch.ops.aten.convolution_backward(
                    grad_output, x, weight, None, stride, padding, dilation, False, [0, 0], groups, [True, False, False]
                )[0]
        return grad_input, None, None, None, None, None, None


@contextlib.contextmanager
def _onednn_off() -> Iterator[None]:
    """oneDNN off for CPU convolutions inside the block, restored after (module docstring). Only this switch:
    `torch.backends.mkldnn.flags()` would also set oneDNN's TF32 and determinism flags, with a warning."""
    enabled = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = enabled
