"""Eval-mode batch norm folded into the convolution (or linear layer) before it, for a model under attack.

In eval mode `BN(conv(x))` is one convolution with weight `w * gamma / sqrt(var + eps)` and a new bias. DeepFool
runs a frozen model through ten passes per step; folded, those passes do no batch-norm work at all (ResNet-18 on
MNIST: 0.3-0.6 s of a 5 s run, `benchmarks/bench_deepfool.py`). The folded model computes the same function up
to float rounding of the folded weights (float32: margins move by about 1e-6 relative).

Folding uses `torch.fx` (`torch.fx.experimental.optimization.fuse`) on a copy of the model: exact module types
only (a `Conv2d` subclass with its own forward is never folded), and only where nothing else reads the
convolution's output. A model `torch.fx` cannot trace (data-dependent control flow) is used as it is.
"""

from __future__ import annotations

import copy

from torch import fx, nn

from models._checks import check_flat_features
from models.normalization import Normalize

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class _Tracer(fx.Tracer):
    """Keeps `Normalize` layers as modules (the stem projection looks for them), like PyTorch's own layers, and
    the zoo's shape checks as calls (they branch on a shape, which tracing cannot)."""

    def __init__(self):
        super().__init__(autowrap_functions=(check_flat_features,))

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return isinstance(module, Normalize) or super().is_leaf_module(module, qualified_name)


def count_batchnorms(model: nn.Module) -> int:
    return sum(type(m) in _BATCHNORMS for m in model.modules())


def fold_batchnorms(model: nn.Module) -> nn.Module:
    """A copy of eval-mode `model` with every batch norm that directly follows a `Conv1d/2d/3d` or `Linear` folded
    into it; `model` itself when there is none to fold or `torch.fx` cannot trace it. `model` is not changed."""
    before = count_batchnorms(model)
    if before == 0 or any(m.training for m in model.modules()):
        return model
    from torch.fx.experimental.optimization import fuse

    try:
        work = copy.deepcopy(model)
        traced = fx.GraphModule(work, _Tracer().trace(work))
        folded = fuse(traced, inplace=True, no_trace=True)
    except Exception:  # untraceable (control flow on values, unsupported ops): fold nothing
        return model
    if count_batchnorms(folded) == before:
        return model
    return folded.eval()
