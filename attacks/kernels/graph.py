"""Rewrites of a working copy of the model on its `torch.fx` graph: the same function, less work per pass.

- batch-norm folding (`fold_batchnorm`): in eval mode `BN(conv(x))` is one convolution with weight
  `w * gamma / sqrt(var + eps)` and a new bias, so the passes do no batch-norm work at all. The folded model computes
  the same function up to float rounding of the folded weights (float32: margins move by about 1e-6 relative).
  Uses `torch.fx.experimental.optimization.fuse`: exact module types only, and only where nothing else reads the
  convolution's output.
- max-pools (`fast_maxpool`, `pool_then_relu`): every 2-d max-pool (`F.max_pool2d`, `torch.max_pool2d`,
  `nn.MaxPool2d`) becomes `attacks.kernels.pooling.max_pool2d`, and a ReLU read only by a max-pool is merged into
  it as `max_pool2d_relu` (an in-place ReLU only where nothing else reads its input, so its write was invisible).
- the stem split (`split_stem`): when the input reaches the logits only through a first convolution (after the
  input normalisation), the graph is cut there into the stem and the body `h -> logits`, so input gradients can
  stop at `h` (`attacks/kernels/stem.py`).

`trace(model)` gives the graph, or None for a model `torch.fx` cannot trace (data-dependent control flow): such a
model gets none of these rewrites.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from attacks.kernels.convolutions import is_plain_conv
from attacks.kernels.pooling import max_pool2d, max_pool2d_relu
from models._checks import check_flat_features
from models.normalization import Normalize

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_POOL_FUNCTIONS = (F.max_pool2d, torch.max_pool2d)
_POOL_ARGUMENTS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")


class _Tracer(fx.Tracer):
    """Keeps `Normalize` layers as modules (the stem split looks for them), like PyTorch's own layers, and the zoo's
    shape checks as calls (they branch on a shape, which tracing cannot)."""

    def __init__(self):
        super().__init__(autowrap_functions=(check_flat_features,))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, Normalize) or super().is_leaf_module(module, qualified_name)


def trace(model: nn.Module) -> fx.GraphModule | None:
    """The graph of eval-mode `model` (sharing its submodules), or None when `torch.fx` cannot trace it."""
    try:
        graph = fx.GraphModule(model, _Tracer().trace(model))
    except Exception:  # untraceable (control flow on values, unsupported ops): no graph rewrites
        return None
    graph.training = model.training  # the new root module's own flag; the submodules are the model's
    return graph


def count_batchnorms(model: nn.Module) -> int:
    return sum(type(m) in _BATCHNORMS for m in model.modules())


def fold_batchnorms(graph: fx.GraphModule) -> fx.GraphModule:
    """`graph` with every batch norm that directly follows a `Conv1d/2d/3d` or `Linear` folded into it; a graph with
    a module in training mode (batch norms then use batch statistics) is returned as it is."""
    if count_batchnorms(graph) == 0 or any(m.training for m in graph.modules() if type(m) in _BATCHNORMS):
        return graph
    from torch.fx.experimental.optimization import fuse

    return fuse(graph, inplace=True, no_trace=True)


def rewrite_max_pools(graph: fx.GraphModule, fast: bool, merge_relus: bool) -> tuple[int, int]:
    """`fast`: every 2-d max-pool of `graph` runs `pooling.max_pool2d`; `merge_relus`: a ReLU only a max-pool reads
    runs inside it (`pooling.max_pool2d_relu`, on the fast pooling path or not). Returns the numbers of pools
    rewritten and of ReLUs merged."""
    modules = dict(graph.named_modules())
    count = merged = 0
    for node in list(graph.graph.nodes):
        arguments = _pool_call(node, modules)
        if arguments is None:
            continue
        source, kwargs = arguments
        relu = source if merge_relus and _merges(source, node, modules) else None
        if relu is not None:
            function, source, kwargs = max_pool2d_relu, relu.all_input_nodes[0], {**kwargs, "fast": fast}
        elif fast:
            function = max_pool2d
        else:
            continue
        with graph.graph.inserting_after(node):
            replacement = graph.graph.call_function(function, (source,), kwargs)
        node.replace_all_uses_with(replacement)
        graph.graph.erase_node(node)
        if relu is not None:
            graph.graph.erase_node(relu)
            merged += 1
        count += 1
    graph.recompile()
    return count, merged


def _pool_call(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[fx.Node, dict] | None:
    """`(input node, pooling arguments)` of a 2-d max-pool call, else None."""
    if node.op == "call_module" and type(modules.get(node.target)) is nn.MaxPool2d:
        pool = modules[node.target]
        kwargs = {name: getattr(pool, name) for name in _POOL_ARGUMENTS}
        return (node.args[0], kwargs) if len(node.args) == 1 and not node.kwargs else None
    if node.op != "call_function" or node.target not in _POOL_FUNCTIONS or not node.args:
        return None
    kwargs = dict(zip(_POOL_ARGUMENTS, node.args[1:]))
    kwargs.update(node.kwargs)
    return node.args[0], kwargs


def _merges(relu: object, pool: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `relu` is a ReLU node read only by `pool` whose result equals `pool(relu(its input))` unchanged: an
    in-place ReLU only when nothing else reads its input."""
    if not isinstance(relu, fx.Node) or len(relu.users) != 1 or len(relu.all_input_nodes) != 1:
        return False
    kind = _relu_kind(relu, modules)
    if kind is None:
        return False
    return kind == "out_of_place" or len(relu.all_input_nodes[0].users) == 1


def _relu_kind(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """ "in_place", "out_of_place" for a plain ReLU of one tensor, else None."""
    if node.op == "call_module" and type(modules.get(node.target)) is nn.ReLU:
        return "in_place" if modules[node.target].inplace else "out_of_place"
    if node.op == "call_function" and node.target in (F.relu, torch.relu) and len(node.args) == 1:
        return "in_place" if node.kwargs.get("inplace", False) else "out_of_place"
    if node.op == "call_function" and node.target is torch.relu_ and len(node.args) == 1:
        return "in_place"
    if node.op == "call_method" and node.target in ("relu", "relu_") and len(node.args) == 1:
        return "in_place" if node.target == "relu_" else "out_of_place"
    return None


@dataclass
class StemSplit:
    """The model cut after its first convolution: `stem(x) = conv(normalize(x))` (normalize may be None), and
    `body(h)` the rest of the graph, so `model(x) == body(stem(x))`. `scale` [C, 1, 1]: the std the input is divided
    by before the convolution (None: no normalisation)."""

    conv: nn.Conv2d
    normalize: Normalize | None
    body: fx.GraphModule

    @property
    def scale(self) -> torch.Tensor | None:
        return None if self.normalize is None else self.normalize.std

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x if self.normalize is None else self.normalize(x))


def split_stem(graph: fx.GraphModule) -> StemSplit | None:
    """The stem split of `graph` (module docstring), or None unless the input's only path to the logits is a plain
    `nn.Conv2d` (optionally after a `Normalize` layer) whose output nothing changes in place."""
    modules = dict(graph.named_modules())
    nodes = list(graph.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    chain, normalize = [placeholders[0]], None
    node = _only_user(placeholders[0])
    if node is not None and node.op == "call_module" and type(modules.get(node.target)) is Normalize:
        normalize, chain = modules[node.target], [*chain, node]
        node = _only_user(node)
    if node is None or node.op != "call_module" or node.args != (chain[-1],) or node.kwargs:
        return None
    conv = modules.get(node.target)
    if (
        not isinstance(conv, nn.Conv2d)
        or not is_plain_conv(conv)
        or any(_writes_in_place(u, modules) for u in node.users)
    ):
        return None
    body = fx.Graph()
    env = {node: body.placeholder("h")}
    for other in nodes:
        if other not in chain and other is not node:
            env[other] = body.node_copy(other, lambda n: env[n])
    return StemSplit(conv, normalize, fx.GraphModule(graph, body))


def _only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _writes_in_place(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether `node` may change its input in place: an in-place ReLU, a method ending in "_", `inplace=True`."""
    if node.op == "call_module":
        return bool(getattr(modules.get(node.target), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_")
    if node.op == "call_function":
        return bool(node.kwargs.get("inplace", False)) or getattr(node.target, "__name__", "").endswith("_")
    return False
