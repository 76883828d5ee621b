"""Device-specific kernels of the margin engine, behind one call: `prepare_model(model, device, dtype, kernels)`.

An attack needs only input gradients of a frozen eval-mode model. `prepare_model` makes, once per evaluation, the
working copy the engine runs (`PreparedModel`): a deep copy in eval mode, in the attack's dtype, on the device,
parameters frozen; the caller's model is never changed. The engine asks it for one thing beyond its logits:
`prepared.subspace_gradients(subspaces)`, the subspace coordinates of input gradients (`gradients.py`), taken
wherever the kernels make them cheapest; the engine never names a kernel.

With `kernels="auto"` on the CPU the copy also gets the kernels that pay there (each measured in docs/ENGINE.md,
each equal to the model's own function up to float rounding; `KERNELS`):

- `fold_batchnorm`: eval-mode batch norms folded into the convolution before them (`graph.py`).
- `fast_maxpool`: max-pooling in channels-last layout or as strided maxima (`pooling.py`).
- `pool_then_relu`: `max_pool2d(relu(h))` as `relu(max_pool2d(h))` with a gradient (`pooling.py`).
- `native_stem_grad`: PyTorch's native input-gradient kernel for convolutions reading <= 4 channels
  (`convolutions.py`).
- `unroll_small_convs`: convolutions over maps no larger than their kernel as one matmul (`convolutions.py`).
- `stem_projection`: gradients stopped at the first convolution and mapped to subspace coordinates by one matmul
  per subspace (`stem.py`, `graph.py: split_stem`).
- `channels_last_body`: convolutions reading at least `CHANNELS_LAST_BODY` channels keep their weights in
  channels-last layout, so they and what follows them run on channels-last maps (oneDNN's faster kernels there for
  deep networks such as ResNet-50), while the image stem stays channels-first.

On CUDA (and any device but the CPU) `auto` applies none: the model runs as written. `kernels="off"` applies none
anywhere; a collection of names applies those (CPU only; for ablations).
"""

from __future__ import annotations

import copy
from collections.abc import Collection

import torch
from torch import nn

from attacks.kernels.convolutions import STEM_CHANNELS, patch_convolutions
from attacks.kernels.gradients import Scores, SubspaceGradients
from attacks.kernels.graph import StemSplit, count_batchnorms, fold_batchnorms, rewrite_max_pools, split_stem, trace
from attacks.kernels.stem import MAX_OUT_CHANNELS, StemProjection
from frequency.subspaces import SubspaceFamily

KERNELS = (
    "fold_batchnorm",
    "fast_maxpool",
    "pool_then_relu",
    "native_stem_grad",
    "unroll_small_convs",
    "stem_projection",
    "channels_last_body",
)
CHANNELS_LAST_BODY = 16  # convolutions reading at least this many channels run channels-last (channels_last_body)
_GRAPH_KERNELS = {"fold_batchnorm", "fast_maxpool", "pool_then_relu", "stem_projection"}


class PreparedModel(nn.Module):
    """The engine's working copy of a classifier `[B, C, H, W] -> logits [B, num_classes]` (module docstring).

    `dtype`, `device`: those of its tensors; `kernels`: the names of the kernels that apply to this model (a kernel
    asked for but without a layer to act on is left out; `unroll_small_convs` acts where a map is small, at run
    time); `stem`: the stem split when `stem_projection` applies to the model (else None).
    """

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        kernels: frozenset[str],
        stem: StemSplit | None,
    ):
        super().__init__()
        self.module = module
        self.device, self.dtype, self.kernels, self.stem = device, dtype, kernels, stem
        self._projections: list[tuple[SubspaceFamily, StemProjection | None]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)

    def train(self, mode: bool = True) -> PreparedModel:
        """Always eval mode: the attack measures the frozen model."""
        return super().train(False)

    def subspace_gradients(self, subspaces: SubspaceFamily) -> SubspaceGradients:
        """The subspace coordinates of this model's input gradients along `subspaces` (`gradients.py`): through the
        stem projection where it applies and pays, else at the input."""
        projection = self.stem_projection(subspaces, tuple(subspaces.image_shape))
        return SubspaceGradients(self, subspaces.to(self.device), self.stem, projection)

    def stem_projection(self, subspaces: SubspaceFamily, image_shape: tuple[int, ...]) -> StemProjection | None:
        """The stem projection for `subspaces` where it applies and pays (built once per family object), else
        None."""
        if self.stem is None:
            return None
        for family, projection in self._projections:
            if family is subspaces:
                return projection
        family = subspaces.to(self.device)
        projection = StemProjection.build(self.stem, family, image_shape, self.dtype, self.device)
        self._projections.append((subspaces, projection))
        return projection


def resolve_kernels(kernels: str | Collection[str], device: torch.device | str) -> frozenset[str]:
    """The kernel names `kernels` ("auto", "off" or names of `KERNELS`) stands for on `device`."""
    device = torch.device(device)
    if isinstance(kernels, str):
        if kernels not in ("auto", "off"):
            raise ValueError(f"kernels must be 'auto', 'off' or a collection of {', '.join(KERNELS)}; got {kernels!r}")
        return frozenset(KERNELS) if kernels == "auto" and device.type == "cpu" else frozenset()
    names = frozenset(kernels)
    unknown = names - set(KERNELS)
    if unknown:
        raise ValueError(f"unknown kernels {sorted(unknown)}; choose from {', '.join(KERNELS)}")
    if names and device.type != "cpu":
        raise ValueError(f"the kernels {sorted(names)} are CPU kernels; on {device.type} use kernels='auto' or 'off'")
    return names


def prepare_model(
    model: nn.Module,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    kernels: str | Collection[str] = "auto",
) -> PreparedModel:
    """The working copy of `model` the engine runs (module docstring). device None: the model's own (its first
    parameter's, else the CPU); dtype None: the model's own floating dtype (float32 for a model without floating
    tensors)."""
    if isinstance(model, PreparedModel):
        raise TypeError("model is already prepared; pass the original model to prepare it again")
    device = torch.device(device) if device is not None else _model_device(model)
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    dtype = dtype or (floats[0].dtype if floats else torch.float32)
    names = resolve_kernels(kernels, device)
    work = copy.deepcopy(model).to(device=device, dtype=dtype).eval().requires_grad_(False)
    applied, stem = set(), None
    graph = trace(work) if names & _GRAPH_KERNELS else None
    if graph is not None:
        if "fold_batchnorm" in names:
            before = count_batchnorms(graph)
            graph = fold_batchnorms(graph)
            applied |= {"fold_batchnorm"} if count_batchnorms(graph) < before else set()
        if names & {"fast_maxpool", "pool_then_relu"}:
            fast, merge = "fast_maxpool" in names, "pool_then_relu" in names
            pools, merged = rewrite_max_pools(graph, fast=fast, merge_relus=merge)
            applied |= ({"fast_maxpool"} if fast and pools else set()) | ({"pool_then_relu"} if merged else set())
        work = graph.eval()
    convs = patch_convolutions(work, "native_stem_grad" in names, "unroll_small_convs" in names)
    if "native_stem_grad" in names and any(c.in_channels <= STEM_CHANNELS for c in convs):
        applied.add("native_stem_grad")
    applied |= {"unroll_small_convs"} & names if convs else set()
    if graph is not None and "stem_projection" in names:
        stem = split_stem(graph)
        narrow = stem is not None and stem.conv.out_channels <= MAX_OUT_CHANNELS and device.type == "cpu"
        applied |= {"stem_projection"} if narrow else set()
    if "channels_last_body" in names and _channels_last_body(work):
        applied.add("channels_last_body")
    return PreparedModel(work, device, dtype, frozenset(applied), stem)


def _channels_last_body(model: nn.Module) -> int:
    """Channels-last weights for the convolutions reading at least `CHANNELS_LAST_BODY` channels (a convolution's
    output takes its weight's layout, so the maps after them are channels-last too); returns how many."""
    body = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.in_channels >= CHANNELS_LAST_BODY]
    for conv in body:
        conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    return len(body)


def _model_device(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


__all__ = ["KERNELS", "PreparedModel", "Scores", "SubspaceGradients", "prepare_model", "resolve_kernels"]
