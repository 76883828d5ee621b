"""A classifier as a list of operations bound propagation understands, read from its `torch.fx` graph.

`network_ops(model, image_shape, dtype, device)` walks the eval-mode model's layers and returns `Network`: its
operations in topological order, each an exact affine map (`Conv`, `Linear`, `Scale`, `AvgPool`, `Reshape`, `Add`)
or a piecewise-linear one (`ReLU`, `MaxPool`), with per-sample shapes. Batch norms in eval mode become per-channel
affine maps, folded into the convolution before them where nothing else reads its output; the model's `Normalize`
is a per-pixel affine map. Anything else raises `UnsupportedLayerError` (an `InputError`) naming the layer.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from attacks.kernels.graph import trace
from common.errors import InputError
from models._checks import check_flat_features
from models.normalization import Normalize


class UnsupportedLayerError(InputError):
    """The model has a layer the certifier cannot bound (the message names it)."""


class Op:
    """One operation: `inputs` (indices of earlier operations), `shape` (per-sample output shape), `name` (the fx
    node's name, for messages)."""

    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)


@dataclass
class Input(Op):
    """The image `x0 + B z` (the subspace coordinates z are the bound propagation's input)."""

    shape: tuple[int, ...]
    name: str = "input"
    inputs: tuple[int, ...] = ()


class Affine(Op):
    """An exact affine map `out = W(h_1, ..., h_m) + bias`. Tensors carry leading batch dimensions: `linear(hs)`
    applies W to `hs[i]: [B, *in_shape_i]`, `absolute(hs)` applies |W| (the elementwise absolute values of W's
    matrix), `transpose(lam: [B, *shape])` returns W^T lam per input, `bias_dot(lam)` is `<lam, bias>` per batch
    entry [B] (zero without bias)."""

    def linear(self, hs: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def absolute(self, hs: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def transpose(self, lam: torch.Tensor) -> list[torch.Tensor]:
        raise NotImplementedError

    def add_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out

    def bias_dot(self, lam: torch.Tensor) -> torch.Tensor:
        return lam.new_zeros(lam.shape[: lam.dim() - len(self.shape)])

    def bias_abs_dot(self, lam: torch.Tensor) -> torch.Tensor:
        """`<|lam|, |bias|>` per batch entry (the magnitude of `bias_dot`'s terms, for the rounding allowance)."""
        return lam.new_zeros(lam.shape[: lam.dim() - len(self.shape)])

    def forward(self, hs: list[torch.Tensor]) -> torch.Tensor:
        return self.add_bias(self.linear(hs))


@dataclass
class Weighted(Affine):
    """An affine operation with a weight tensor and an optional bias."""

    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str
    weight: torch.Tensor
    bias: torch.Tensor | None


DENSE_ENTRIES = 2**22  # a convolution applies as a dense matrix of at most this many entries (32 MiB in float64)
DENSE_WORK = 16  # ... that costs at most this many times the convolution's multiply-adds


@dataclass
class Conv(Weighted):
    """2-d convolution (zero padding), bias optional; batch norm folded in where it followed.

    `linear` and `absolute` multiply by the convolution's dense matrix where it is small (`DENSE_ENTRIES`,
    `DENSE_WORK`: LeNet's second convolution, 1176 x 1600): one matrix product of the whole batch is about twice
    as fast as float64 convolutions on CPU (docs/CERTIFY.md); `transpose` stays a convolution."""

    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    in_shape: tuple[int, ...]
    _dense: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def _conv(self, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        lead = h.shape[: h.dim() - 3]
        out = F.conv2d(
            h.reshape(-1, *self.in_shape), weight, None, self.stride, self.padding, self.dilation, self.groups
        )
        return out.reshape(*lead, *self.shape)

    def _matrices(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The dense matrices `[in_size, out_size]` of W and |W| when small enough, else None (built once)."""
        in_size = math.prod(self.in_shape)
        entries = in_size * self.size
        if entries > DENSE_ENTRIES or entries > DENSE_WORK * self.size * self.weight[0].numel():
            return None
        if self._dense is None:
            eye = torch.eye(in_size, dtype=self.weight.dtype, device=self.weight.device).view(in_size, *self.in_shape)
            self._dense = (self._conv(eye, self.weight).reshape(in_size, -1),
                           self._conv(eye, self.weight.abs()).reshape(in_size, -1))  # fmt: skip
        return self._dense

    def _apply(self, h: torch.Tensor, absolute: bool) -> torch.Tensor:
        matrices = self._matrices()
        if matrices is None:
            return self._conv(h, self.weight.abs() if absolute else self.weight)
        lead = h.shape[: h.dim() - 3]
        out = h.reshape(-1, matrices[0].shape[0]) @ matrices[int(absolute)]
        return out.reshape(*lead, *self.shape)

    def linear(self, hs: list[torch.Tensor]) -> torch.Tensor:
        return self._apply(hs[0], False)

    def absolute(self, hs: list[torch.Tensor]) -> torch.Tensor:
        return self._apply(hs[0], True)

    def transpose(self, lam: torch.Tensor) -> list[torch.Tensor]:
        lead = lam.shape[: lam.dim() - 3]
        flat = lam.reshape(-1, *self.shape)
        out = torch.nn.grad.conv2d_input(
            (flat.shape[0], *self.in_shape), self.weight, flat, self.stride, self.padding, self.dilation, self.groups
        )
        return [out.reshape(*lead, *self.in_shape)]

    def add_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.bias is None else out + self.bias[:, None, None]

    def bias_dot(self, lam: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return lam.new_zeros(lam.shape[: lam.dim() - 3])
        return (lam.sum(dim=(-1, -2)) * self.bias).sum(-1)

    def bias_abs_dot(self, lam: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return lam.new_zeros(lam.shape[: lam.dim() - 3])
        return (lam.abs().sum(dim=(-1, -2)) * self.bias.abs()).sum(-1)


@dataclass
class Linear(Weighted):
    """Fully connected layer on flat features [F]."""

    def linear(self, hs: list[torch.Tensor]) -> torch.Tensor:
        return hs[0] @ self.weight.T

    def absolute(self, hs: list[torch.Tensor]) -> torch.Tensor:
        return hs[0] @ self.weight.abs().T

    def transpose(self, lam: torch.Tensor) -> list[torch.Tensor]:
        return [lam @ self.weight]

    def add_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out if self.bias is None else out + self.bias

    def bias_dot(self, lam: torch.Tensor) -> torch.Tensor:
        return lam.new_zeros(lam.shape[:-1]) if self.bias is None else lam @ self.bias

    def bias_abs_dot(self, lam: torch.Tensor) -> torch.Tensor:
        return lam.new_zeros(lam.shape[:-1]) if self.bias is None else lam.abs() @ self.bias.abs()


@dataclass
class Scale(Affine):
    """Elementwise `h * scale + shift` (`scale`, `shift` broadcast against the per-sample shape): the model's
    normalisation, a batch norm not folded into a convolution."""

    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str
    scale: torch.Tensor
    shift: torch.Tensor

    def linear(self, hs: list[torch.Tensor]) -> torch.Tensor:
        return hs[0] * self.scale

    def absolute(self, hs: list[torch.Tensor]) -> torch.Tensor:
        return hs[0] * self.scale.abs()

    def transpose(self, lam: torch.Tensor) -> list[torch.Tensor]:
        return [lam * self.scale]

    def add_bias(self, out: torch.Tensor) -> torch.Tensor:
        return out + self.shift

    def bias_dot(self, lam: torch.Tensor) -> torch.Tensor:
        return (lam * self.shift).flatten(lam.dim() - len(self.shape)).sum(-1)

    def bias_abs_dot(self, lam: torch.Tensor) -> torch.Tensor:
        return (lam.abs() * self.shift.abs()).flatten(lam.dim() - len(self.shape)).sum(-1)


@dataclass
class Pool(Op):
    """2-d pooling over `kernel` windows moved by `stride`, `padding` pixels added on each side of `in_shape`."""

    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    in_shape: tuple[int, ...]


@dataclass
class AvgPool(Pool, Affine):
    """2-d average pooling (zero padding counted in the divisor, as `F.avg_pool2d`'s default)."""

    def linear(self, hs: list[torch.Tensor]) -> torch.Tensor:
        h = hs[0]
        lead = h.shape[: h.dim() - 3]
        out = F.avg_pool2d(h.reshape(-1, *self.in_shape), self.kernel, self.stride, self.padding)
        return out.reshape(*lead, *self.shape)

    def absolute(self, hs: list[torch.Tensor]) -> torch.Tensor:
        return self.linear(hs)

    def transpose(self, lam: torch.Tensor) -> list[torch.Tensor]:
        lead = lam.shape[: lam.dim() - 3]
        flat = lam.reshape(-1, *self.shape)
        zeros = flat.new_zeros(flat.shape[0], *self.in_shape)
        _, pullback = torch.func.vjp(lambda h: self.linear([h]), zeros)
        return [pullback(flat)[0].reshape(*lead, *self.in_shape)]


@dataclass
class Reshape(Affine):
    """A change of per-sample shape (flatten, view)."""

    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str
    in_shape: tuple[int, ...]

    def linear(self, hs: list[torch.Tensor]) -> torch.Tensor:
        h = hs[0]
        return h.reshape(*h.shape[: h.dim() - len(self.in_shape)], *self.shape)

    def absolute(self, hs: list[torch.Tensor]) -> torch.Tensor:
        return self.linear(hs)

    def transpose(self, lam: torch.Tensor) -> list[torch.Tensor]:
        return [lam.reshape(*lam.shape[: lam.dim() - len(self.shape)], *self.in_shape)]


@dataclass
class Add(Affine):
    """Sum of two tensors of the same shape (residual connections)."""

    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str

    def linear(self, hs: list[torch.Tensor]) -> torch.Tensor:
        return hs[0] + hs[1]

    def absolute(self, hs: list[torch.Tensor]) -> torch.Tensor:
        return hs[0] + hs[1]

    def transpose(self, lam: torch.Tensor) -> list[torch.Tensor]:
        return [lam, lam]


@dataclass
class ReLU(Op):
    inputs: tuple[int, ...]
    shape: tuple[int, ...]
    name: str


@dataclass
class MaxPool(Pool):
    """2-d max pooling (padding counts as -inf, as in `F.max_pool2d`)."""


@dataclass
class Network:
    """The operations of a classifier in topological order (`ops[0]` is the `Input`, `ops[output]` gives the
    logits [num_classes])."""

    ops: list[Op]
    output: int

    @property
    def num_classes(self) -> int:
        return self.ops[self.output].shape[0]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Every operation's value for images `x: [B, *image_shape]` (for checks): a list of [B, *op.shape]."""
        values: list[torch.Tensor] = []
        for op in self.ops:
            hs = [values[i] for i in op.inputs]
            if isinstance(op, Input):
                values.append(x)
            elif isinstance(op, Affine):
                values.append(op.forward(hs))
            elif isinstance(op, ReLU):
                values.append(torch.relu(hs[0]))
            else:
                assert isinstance(op, MaxPool)
                values.append(F.max_pool2d(hs[0], op.kernel, op.stride, op.padding))
        return values


_Size = int | tuple[int, ...]  # a pooling size as the layer gives it: one int or a pair
_RELU_FUNCTIONS = (F.relu, torch.relu, torch.relu_)
_MAXPOOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)
_ADD_FUNCTIONS = (operator.add, operator.iadd, torch.add)
_FLATTEN_FUNCTIONS = (torch.flatten,)
_IDENTITY_MODULES = (nn.Identity, nn.Dropout, nn.Dropout2d)
_SHAPE_METHODS = ("size", "dim")


def network_ops(
    model: nn.Module, image_shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str
) -> Network:
    """The operations of `model` (a classifier `[B, *image_shape] -> [B, num_classes]`, evaluated in eval mode) in
    `dtype` on `device`. Raises `UnsupportedLayerError` naming the first layer bound propagation cannot handle."""
    work = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    graph = trace(work)
    if graph is None:
        raise UnsupportedLayerError(
            f"{type(model).__name__} cannot be traced by torch.fx (data-dependent control flow); the certifier "
            "supports networks of convolutions, linear layers, batch norms, ReLU, max/average pooling and additions"
        )
    ShapeProp(graph).propagate(torch.zeros(1, *image_shape, dtype=dtype, device=device))
    return _Converter(graph).run()


class _Converter:
    """Turns the traced graph's nodes into `Op`s (one pass in the graph's order)."""

    def __init__(self, graph: fx.GraphModule):
        self.graph = graph
        self.modules = dict(graph.named_modules())
        self.ops: list[Op] = []
        self.index: dict[fx.Node, int] = {}

    def run(self) -> Network:
        output = None
        for node in self.graph.graph.nodes:
            if node.op == "output":
                output = self._tensor_input(node.args[0], node)
            else:
                self._convert(node)
        assert output is not None
        if len(self.ops[output].shape) != 1:
            raise UnsupportedLayerError(
                f"the model returns shape {self.ops[output].shape} per sample; the certifier needs logits [classes]"
            )
        ops = _fold_batchnorms(self.ops, output)
        return _pruned(ops, output)

    def _convert(self, node: fx.Node) -> None:
        if node.op == "placeholder":
            self._add(node, Input(_shape(node)))
        elif node.op == "get_attr" or (node.op == "call_method" and node.target in _SHAPE_METHODS):
            return  # parameters read by shape checks, sizes read by reshapes: not tensors of the computation
        elif node.op == "call_function" and node.target is check_flat_features:
            return
        elif node.op == "call_module":
            self._module(node, self.modules[node.target])
        elif node.op == "call_function":
            self._function(node)
        elif node.op == "call_method":
            self._method(node)
        else:
            raise _unsupported(node)

    def _add(self, node: fx.Node, op: Op) -> None:
        self.index[node] = len(self.ops)
        self.ops.append(op)

    def _alias(self, node: fx.Node, source: object) -> None:
        self.index[node] = self._tensor_input(source, node)

    def _tensor_input(self, arg: object, node: fx.Node) -> int:
        if not isinstance(arg, fx.Node) or arg not in self.index:
            raise UnsupportedLayerError(
                f"layer {node.name!r} ({node.target}) reads {arg!r}, not a tensor of the network"
            )
        return self.index[arg]

    def _module(self, node: fx.Node, module: nn.Module) -> None:
        source = self._tensor_input(node.args[0], node) if node.args else None
        shape, in_shape = _shape(node), self.ops[source].shape if source is not None else ()
        name = node.name
        if len(node.args) != 1 or node.kwargs:
            raise _unsupported(node, module)
        if isinstance(module, _IDENTITY_MODULES):
            self._alias(node, node.args[0])
        elif type(module) is nn.Conv2d and module.padding_mode == "zeros":
            weight, bias = module.weight.detach(), None if module.bias is None else module.bias.detach()
            padding = _pair(module.padding)
            conv = Conv((source,), shape, name, weight, bias, module.stride, padding, module.dilation,
                        module.groups, in_shape)  # fmt: skip
            self._add(node, conv)
        elif type(module) is nn.Linear:
            bias = None if module.bias is None else module.bias.detach()
            self._add(node, Linear((source,), shape, name, module.weight.detach(), bias))
        elif type(module) in (nn.BatchNorm1d, nn.BatchNorm2d) and module.running_mean is not None:
            scale, shift = _batchnorm_affine(module)
            view = (-1,) + (1,) * (len(shape) - 1)
            self._add(node, Scale((source,), shape, name, scale.view(view), shift.view(view)))
        elif type(module) is Normalize:
            self._add(node, Scale((source,), shape, name, 1.0 / module.std, -module.mean / module.std))
        elif type(module) is nn.ReLU:
            self._add(node, ReLU((source,), shape, name))
        elif type(module) is nn.MaxPool2d:
            self._maxpool(node, source, module.kernel_size, module.stride, module.padding, module.dilation,
                          module.ceil_mode, module.return_indices)  # fmt: skip
        elif type(module) is nn.AvgPool2d:
            self._avgpool(node, source, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                          module.count_include_pad, module.divisor_override)  # fmt: skip
        elif type(module) is nn.AdaptiveAvgPool2d:
            self._adaptive_avgpool(node, source)
        elif type(module) is nn.Flatten:
            self._add(node, Reshape((source,), shape, name, in_shape))
        else:
            raise _unsupported(node, module)

    def _function(self, node: fx.Node) -> None:
        target = node.target
        if target in _RELU_FUNCTIONS:
            source = self._tensor_input(node.args[0], node)
            self._add(node, ReLU((source,), _shape(node), node.name))
        elif target in _MAXPOOL_FUNCTIONS:
            arguments = dict(zip(("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices"),
                                 node.args[1:]))  # fmt: skip
            arguments.update(node.kwargs)
            kernel = arguments["kernel_size"]
            stride = arguments.get("stride") or kernel
            source = self._tensor_input(node.args[0], node)
            self._maxpool(node, source, kernel, stride, arguments.get("padding", 0), arguments.get("dilation", 1),
                          arguments.get("ceil_mode", False), arguments.get("return_indices", False))  # fmt: skip
        elif target in _ADD_FUNCTIONS:
            self._addition(node)
        elif target in _FLATTEN_FUNCTIONS:
            self._reshape(node)
        elif target is F.adaptive_avg_pool2d:
            self._adaptive_avgpool(node, self._tensor_input(node.args[0], node))
        else:
            raise _unsupported(node)

    def _method(self, node: fx.Node) -> None:
        if node.target in ("relu", "relu_"):
            self._add(node, ReLU((self._tensor_input(node.args[0], node),), _shape(node), node.name))
        elif node.target in ("flatten", "view", "reshape"):
            self._reshape(node)
        elif node.target in ("add", "add_", "__add__", "__iadd__"):
            self._addition(node)
        elif node.target == "contiguous":
            self._alias(node, node.args[0])
        else:
            raise _unsupported(node)

    def _reshape(self, node: fx.Node) -> None:
        source = self._tensor_input(node.args[0], node)
        shape = _shape(node)
        if math.prod(shape) != self.ops[source].size:
            raise _unsupported(node)  # a reshape that mixes samples
        self._add(node, Reshape((source,), shape, node.name, self.ops[source].shape))

    def _addition(self, node: fx.Node) -> None:
        if len(node.args) != 2 or node.kwargs:
            raise _unsupported(node)
        left, right = (self._tensor_input(arg, node) for arg in node.args)
        shape = _shape(node)
        if self.ops[left].shape != shape or self.ops[right].shape != shape:
            raise UnsupportedLayerError(f"layer {node.name!r} adds tensors of different shapes (broadcasting)")
        self._add(node, Add((left, right), shape, node.name))

    def _maxpool(self, node, source, kernel, stride, padding, dilation, ceil_mode, return_indices) -> None:
        if _pair(dilation) != (1, 1) or ceil_mode or return_indices:
            raise UnsupportedLayerError(
                f"layer {node.name!r}: max pooling with dilation, ceil_mode or return_indices is not supported"
            )
        self._pool(node, MaxPool, source, kernel, stride, padding)

    def _avgpool(self, node, source, kernel, stride, padding, ceil_mode, count_include_pad, divisor) -> None:
        if ceil_mode or not count_include_pad or divisor is not None:
            raise UnsupportedLayerError(
                f"layer {node.name!r}: average pooling with ceil_mode, count_include_pad=False or divisor_override "
                "is not supported"
            )
        self._pool(node, AvgPool, source, kernel, stride, padding)

    def _pool(self, node: fx.Node, kind: type[Pool], source: int, kernel: _Size, stride: _Size | None,
              padding: _Size) -> None:  # fmt: skip
        """Adds a `kind` pooling of operation `source` (sizes as ints or pairs; no stride: the kernel)."""
        self._add(node, kind((source,), _shape(node), node.name, _pair(kernel), _pair(stride or kernel),
                             _pair(padding), self.ops[source].shape))  # fmt: skip

    def _adaptive_avgpool(self, node: fx.Node, source: int) -> None:
        in_shape, shape = self.ops[source].shape, _shape(node)
        if in_shape[1] % shape[1] or in_shape[2] % shape[2]:
            raise UnsupportedLayerError(
                f"layer {node.name!r}: adaptive average pooling from {in_shape[1:]} to {shape[1:]} (not a whole "
                "number of pixels per output) is not supported"
            )
        kernel = (in_shape[1] // shape[1], in_shape[2] // shape[2])
        self._add(node, AvgPool((source,), shape, node.name, kernel, kernel, (0, 0), in_shape))


def _fold_batchnorms(ops: list[Op], output: int) -> list[Op]:
    """Every `Scale` from a batch norm that alone reads a convolution's output, folded into that convolution (the
    `Scale` becomes the folded `Conv`, the convolution stays as an unread operation)."""
    readers: dict[int, int] = {}
    for op in ops:
        for i in op.inputs:
            readers[i] = readers.get(i, 0) + 1
    out = list(ops)
    for index, op in enumerate(ops):
        if not isinstance(op, Scale) or op.scale.dim() != 3 or op.scale.shape[1:] != (1, 1):
            continue
        (source,) = op.inputs
        conv = out[source]
        if not isinstance(conv, Conv) or readers.get(source, 0) != 1 or source == output:
            continue
        scale, shift = op.scale.flatten(), op.shift.flatten()
        if scale.numel() != conv.weight.shape[0] or op.shift.shape[1:] != (1, 1):
            continue
        bias = shift if conv.bias is None else conv.bias * scale + shift
        folded = Conv(conv.inputs, op.shape, f"{conv.name}+{op.name}", conv.weight * scale[:, None, None, None], bias,
                      conv.stride, conv.padding, conv.dilation, conv.groups, conv.in_shape)  # fmt: skip
        out[index] = folded
    return out


def _pruned(ops: list[Op], output: int) -> Network:
    """The operations the output depends on, renumbered in the same order."""
    needed = {output}
    for index in range(output, -1, -1):
        if index in needed:
            needed.update(ops[index].inputs)
    kept = sorted(needed)
    new_index = {old: new for new, old in enumerate(kept)}
    out = []
    for old in kept:
        op = copy.copy(ops[old])
        op.inputs = tuple(new_index[i] for i in op.inputs)
        out.append(op)
    return Network(out, new_index[output])


def _batchnorm_affine(module: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as `h * scale + shift` per channel."""
    scale = torch.rsqrt(module.running_var + module.eps)
    if module.weight is not None:
        scale = scale * module.weight.detach()
    shift = -module.running_mean * scale
    if module.bias is not None:
        shift = shift + module.bias.detach()
    return scale, shift


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        raise _unsupported(node)
    return tuple(int(v) for v in meta.shape[1:])


def _pair(value: _Size) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _unsupported(node: fx.Node, module: nn.Module | None = None) -> UnsupportedLayerError:
    what = type(module).__name__ if module is not None else getattr(node.target, "__name__", str(node.target))
    return UnsupportedLayerError(
        f"the certifier does not support layer {node.name!r} ({what}); supported: Conv2d, Linear, BatchNorm "
        "(eval), Normalize, ReLU, MaxPool2d, AvgPool2d, AdaptiveAvgPool2d (whole pixels), flatten/view, additions"
    )
