"""Rewrites of a model under attack, on a copy: the same function, less work per pass.

DeepFool runs a frozen eval-mode model through ten passes per step. Three rewrites save work in every pass; the
first two act on a `torch.fx` graph of the model:

- batch-norm folding: in eval mode `BN(conv(x))` is one convolution with weight `w * gamma / sqrt(var + eps)` and
  a new bias, so the passes do no batch-norm work at all (ResNet-18 on MNIST: 0.3-0.6 s of a 5 s run,
  `benchmarks/bench_deepfool.py`). The folded model computes the same function up to float rounding of the
  folded weights (float32: margins move by about 1e-6 relative). Uses `torch.fx.experimental.optimization.fuse`:
  exact module types only (a `Conv2d` subclass with its own forward is never folded), and only where nothing else
  reads the convolution's output.
- out-of-place ReLUs before max-pools: an in-place ReLU whose input nothing else reads and whose output only a
  max-pool reads (ResNet's stem, `relu(inplace=True)` then `maxpool`) becomes `torch.relu`. The values are the
  same; the point is that `attacks/fast_functions.py` can then run `max_pool2d(relu(h))` as
  `relu(max_pool2d(h))`, with the ReLU's backward on the 4x smaller pooled map (it cannot rewrite an in-place
  ReLU, whose backward is recorded on the large map before the pool is seen).
- a channels-last body: convolutions reading at least `CHANNELS_LAST_BODY` channels keep their weights in
  channels-last layout, so they and everything after them run on channels-last maps (a convolution's output takes
  the layout of its weight), while the image stem stays channels-first. On the CPU, oneDNN's channels-last
  kernels are 1.2-1.6x faster for ResNet's 3x3 layers on 7x7 and 4x4 maps (265 rows, 1 thread: backward 13.3
  against 18.1 ms and 15.2 against 20.6 ms); a whole channels-last model loses that gain in its stem (a 64-channel
  14x14 map per row, and batch norms that cannot be folded there). Float results move by rounding only.

`rewrite_for_attack(model, fold_batchnorm=..., relu_before_pool=..., channels_last_body=...)` returns the rewritten
copy, or the model itself when no rewrite applies or the model is in training mode; a model `torch.fx` cannot
trace (data-dependent control flow) gets only the layout rewrite. The caller's model is never changed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx, nn

from models._checks import check_flat_features
from models.normalization import Normalize

CHANNELS_LAST_BODY = 16  # convolutions reading at least this many channels run channels-last (channels_last_body)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)


class _Tracer(fx.Tracer):
    """Keeps `Normalize` layers as modules (the stem projection looks for them), like PyTorch's own layers, and
    the zoo's shape checks as calls (they branch on a shape, which tracing cannot)."""

    def __init__(self):
        super().__init__(autowrap_functions=(check_flat_features,))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, Normalize) or super().is_leaf_module(module, qualified_name)


def count_batchnorms(model: nn.Module) -> int:
    return sum(type(m) in _BATCHNORMS for m in model.modules())


def rewrite_for_attack(
    model: nn.Module, fold_batchnorm: bool = True, relu_before_pool: bool = True, channels_last_body: bool = False
) -> nn.Module:
    """A copy of eval-mode `model` with the rewrites switched on (module docstring), or `model` itself when none
    applies. `model` is not changed."""
    if any(m.training for m in model.modules()):
        return model
    rewritten = _rewrite_graph(model, fold_batchnorm, relu_before_pool)
    body = [m for m in rewritten.modules() if _in_body(m)] if channels_last_body else []
    if body and rewritten is model:
        rewritten = copy.deepcopy(model)
        body = [m for m in rewritten.modules() if _in_body(m)]
    for conv in body:
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    return rewritten


def _in_body(module: nn.Module) -> bool:
    """A 2-d convolution past the image stem whose weight is not channels-last yet."""
    return (
        isinstance(module, nn.Conv2d)
        and module.in_channels >= CHANNELS_LAST_BODY
        and not module.weight.is_contiguous(memory_format=torch.channels_last)
    )


def _rewrite_graph(model: nn.Module, fold_batchnorm: bool, relu_before_pool: bool) -> nn.Module:
    """The `torch.fx` rewrites: a copy with them, or `model` when none applies or tracing fails."""
    fold = fold_batchnorm and count_batchnorms(model) > 0
    pools = relu_before_pool and any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    if not (fold or pools):
        return model
    try:
        work = copy.deepcopy(model)
        traced = fx.GraphModule(work, _Tracer().trace(work))
        if fold:
            from torch.fx.experimental.optimization import fuse

            traced = fuse(traced, inplace=True, no_trace=True)
    except Exception:  # untraceable (control flow on values, unsupported ops): rewrite nothing
        return model
    changed = fold and count_batchnorms(traced) < count_batchnorms(model)
    if pools:
        changed = _relus_out_of_place(traced) > 0 or changed
    return traced.eval() if changed else model


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """`model` with every batch norm that directly follows a `Conv1d/2d/3d` or `Linear` folded into it (a copy),
    or `model` itself when there is none to fold or `torch.fx` cannot trace it."""
    return rewrite_for_attack(model, fold_batchnorm=True, relu_before_pool=False)


def _relus_out_of_place(traced: fx.GraphModule) -> int:
    """Replaces each in-place ReLU that only a max-pool reads, and whose input nothing else reads, with
    `torch.relu` (so the in-place write was invisible); returns how many were replaced."""
    modules = dict(traced.named_modules())
    count = 0
    for node in list(traced.graph.nodes):
        if not _is_inplace_relu(node, modules) or len(node.users) != 1:
            continue
        (source,) = node.all_input_nodes or (None,)
        if source is None or len(source.users) != 1 or not _is_max_pool(next(iter(node.users)), modules):
            continue
        with traced.graph.inserting_after(node):
            replacement = traced.graph.call_function(torch.relu, (source,))
        node.replace_all_uses_with(replacement)
        traced.graph.erase_node(node)
        count += 1
    if count:
        traced.recompile()
    return count


def _is_inplace_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules.get(node.target)
        return type(module) is nn.ReLU and module.inplace
    if node.op == "call_function":
        return node.target is torch.relu_ or (node.target is F.relu and bool(node.kwargs.get("inplace", False)))
    return node.op == "call_method" and node.target == "relu_"


def _is_max_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return type(modules.get(node.target)) is nn.MaxPool2d
    return node.op == "call_function" and node.target in _POOL_FUNCTIONS
