"""Strict loading of weights into zoo networks from the checkpoint formats users will have.

Formats (recognised from the file's content):
- a raw `state_dict` (the release's `model.t7`), with or without DataParallel `module.` prefixes;
  also the state_dict of a whole NormalizedModel (`normalize.*`, `net.*`);
- a Lightning checkpoint of this project: `{"state_dict": {"model.normalize.mean", "model.normalize.std",
  "model.net.<param>", ...}, ...}` (keys outside `model.` belong to the LightningModule and are ignored);
- a MadryLab robustness checkpoint: `{"model": {"module.model.<param>", "module.attacker.model.<param>"
  (duplicate, ignored), "module.normalizer.new_mean", "module.normalizer.new_std"}, "epoch", ...}`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from common.errors import InputError

from .checkpoint import (
    CheckpointReadError,
    UntrustedCheckpointError,
    checkpoint_kind,
    needs_trust,
    read_checkpoint,
    untrusted_pickle_error,
)

__all__ = [
    "CheckpointMismatchError",
    "UntrustedCheckpointError",
    "guess_architecture",
    "load_weights",
    "needs_trust",
    "untrusted_pickle_error",
]
from .normalization import NormalizedModel

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP, torch.compile
_MAX_LISTED = 10


class CheckpointMismatchError(InputError):
    """The checkpoint's parameters do not match the model (missing/unexpected keys, wrong shapes)."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str], shape_mismatches: list[str]):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.shape_mismatches = shape_mismatches


@dataclass
class _Parsed:
    """A checkpoint reduced to the network's state_dict and (optionally) normalisation buffers."""

    fmt: str
    net: dict[str, torch.Tensor]
    normalize: dict[str, torch.Tensor] = field(default_factory=dict)  # keys "mean", "std"
    unexpected: list[str] = field(default_factory=list)  # keys that belong to neither


def load_weights(
    model: nn.Module,
    path: str | Path,
    trusted_pickle: bool = False,
    map_location: str | torch.device | None = "cpu",
    content: object = None,
) -> nn.Module:
    """Load a checkpoint into `model` in place, strictly, and return `model`.

    If `model` is a NormalizedModel, the network weights go into `model.net` and the checkpoint's
    normalisation (Lightning `model.normalize.*`, MadryLab `normalizer.new_mean/new_std`, per-channel
    values expanded to the model's [C, H, W] mean) into `model.normalize`; a raw state_dict leaves
    `model.normalize` as it is. For a bare network the checkpoint's normalisation is ignored: the
    caller must then normalise the input itself.

    Files are read with `torch.load(weights_only=True)`; `trusted_pickle=True` allows pickled Python
    objects (MadryLab checkpoints need it), which can execute code: use it on trusted files only.
    `content`: the already loaded file (`models.checkpoint.inspect_checkpoint(...).content`), to read it once.
    Raises CheckpointReadError, UntrustedCheckpointError, CheckpointMismatchError (nothing is loaded then).
    """
    path = Path(path)
    obj = content if content is not None else read_checkpoint(path, trusted_pickle, map_location)
    parsed = _parse(obj, path)
    if isinstance(model, NormalizedModel):
        net, normalize = model.net, model.normalize
    else:
        net, normalize = model, None
    net_sd = _with_bn_counters(parsed.net, net)
    missing, unexpected, shapes = _compare(net_sd, net.state_dict())
    unexpected += parsed.unexpected
    norm_values: dict[str, torch.Tensor] = {}
    if normalize is not None and parsed.normalize:
        norm_values, n_missing, n_shapes = _fit_normalize(parsed.normalize, normalize)
        missing += n_missing
        shapes += n_shapes
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(
            _mismatch_message(path, parsed, net, missing, unexpected, shapes), missing, unexpected, shapes
        )
    net.load_state_dict(net_sd, strict=True)
    with torch.no_grad():
        for name, value in norm_values.items():
            getattr(normalize, name).copy_(value)
    return model


def _parse(obj: object, path: Path) -> _Parsed:
    kind, weights = checkpoint_kind(obj, path)
    if kind == "lightning":
        return _parse_lightning(_strip_wrappers(weights), path)
    if kind == "madrylab":
        return _parse_madry(_strip_wrappers(weights))
    return _split_normalized(_strip_wrappers(weights), "state_dict")


def _parse_lightning(sd: Mapping[str, torch.Tensor], path: Path) -> _Parsed:
    sub = _sub_dict(sd, "model.")
    if not sub:
        raise CheckpointReadError(
            f"{path} is a Lightning checkpoint without 'model.*' weights (expected the LightningModule to hold "
            f"the network as attribute 'model'); its keys start with: {', '.join(list(sd)[:_MAX_LISTED])}"
        )
    return _split_normalized(_strip_wrappers(sub), "Lightning checkpoint")


def _parse_madry(sd: Mapping[str, torch.Tensor]) -> _Parsed:
    if not any(k.startswith(("model.", "normalizer.")) for k in sd):  # some other {"model": state_dict} wrapper
        return _split_normalized(dict(sd), "checkpoint['model']")
    normalize = {}
    for key, name in (("normalizer.new_mean", "mean"), ("normalizer.new_std", "std")):
        if key in sd:
            normalize[name] = sd[key]
    known = ("model.", "attacker.", "normalizer.new_mean", "normalizer.new_std")
    unexpected = [f"module.{k}" for k in sd if not k.startswith(known)]
    return _Parsed("MadryLab robustness checkpoint", _sub_dict(sd, "model."), normalize, unexpected)


def _split_normalized(sd: Mapping[str, torch.Tensor], fmt: str) -> _Parsed:
    """Split a NormalizedModel state_dict (`normalize.*`, `net.*`); any other dict is the network's."""
    if not any(k.startswith("net.") for k in sd):
        return _Parsed(fmt, dict(sd))
    normalize = {k: sd[f"normalize.{k}"] for k in ("mean", "std") if f"normalize.{k}" in sd}
    unexpected = [k for k in sd if not k.startswith("net.") and k not in ("normalize.mean", "normalize.std")]
    return _Parsed(fmt, _sub_dict(sd, "net."), normalize, unexpected)


def _sub_dict(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def _strip_wrappers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove `module.` / `_orig_mod.` prefixes shared by every key."""
    sd = dict(sd)
    while sd:
        prefix = next((p for p in _WRAPPER_PREFIXES if all(k.startswith(p) for k in sd)), None)
        if prefix is None:
            break
        sd = _sub_dict(sd, prefix)
    return sd


def _with_bn_counters(sd: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """Old checkpoints lack BatchNorm's `num_batches_tracked`; fill it from the model (it only counts steps)."""
    sd = dict(sd)
    for key, value in net.state_dict().items():
        if key.endswith("num_batches_tracked") and key not in sd and key.rsplit(".", 1)[0] + ".weight" in sd:
            sd[key] = value.clone()
    return sd


def _compare(
    sd: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    missing = [k for k in target if k not in sd]
    unexpected = [k for k in sd if k not in target]
    shapes = [
        f"{k}: checkpoint {list(sd[k].shape)} vs model {list(target[k].shape)}"
        for k in target
        if k in sd and sd[k].shape != target[k].shape
    ]
    return missing, unexpected, shapes


def _fit_normalize(
    values: Mapping[str, torch.Tensor], normalize: nn.Module
) -> tuple[dict[str, torch.Tensor], list[str], list[str]]:
    """Checkpoint mean/std reshaped to the model's buffers: [C, H, W] as is, or per-channel [C, 1, 1] expanded."""
    fitted, missing, shapes = {}, [], []
    for name in ("mean", "std"):
        target = getattr(normalize, name)
        if name not in values:
            missing.append(f"normalize.{name}")
            continue
        src = values[name]
        per_channel = (
            src.dim() == 3
            and src.shape[0] == target.shape[0]
            and all(s in (1, t) for s, t in zip(src.shape[1:], target.shape[1:]))
        )
        if src.shape == target.shape or per_channel:
            fitted[name] = src.to(target.dtype).expand(target.shape).clone()
        else:
            shapes.append(f"normalize.{name}: checkpoint {list(src.shape)} vs model {list(target.shape)}")
    return fitted, missing, shapes


def _listing(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f", ... (+{len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


def _mismatch_message(
    path: Path, parsed: _Parsed, net: nn.Module, missing: list[str], unexpected: list[str], shapes: list[str]
) -> str:
    lines = [f"{path} ({parsed.fmt}) does not match the model ({type(net).__name__}):"]
    if missing:
        lines.append(f"  {len(missing)} missing key(s) (in the model, not in the checkpoint): {_listing(missing)}")
    if unexpected:
        lines.append(
            f"  {len(unexpected)} unexpected key(s) (in the checkpoint, not in the model): {_listing(unexpected)}"
        )
    if shapes:
        lines.append(f"  {len(shapes)} shape mismatch(es): {_listing(shapes)}")
    lines.append("  " + _suggestion(parsed.net, net.state_dict(), shapes))
    return "\n".join(lines)


def _suggestion(ckpt: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], shapes: list[str]) -> str:
    have, want = guess_architecture(ckpt), guess_architecture(target)
    if have is None:
        return (
            "Likely fix: build the model that produced this checkpoint (wrong --model?), with the same "
            "num_classes, in_channels and, for lenet, image size."
        )
    desc = ", ".join(f"{k}={v}" for k, v in have.items() if k != "name")
    if want is None or want["name"] != have["name"]:
        return f"The checkpoint looks like a {have['name']!r} network ({desc}). Likely fix: --model {have['name']}."
    diffs = [f"{k}: checkpoint {have[k]} vs model {want[k]}" for k in have if k != "name" and have[k] != want.get(k)]
    if diffs:
        return (
            f"Both are {have['name']!r} but differ in {'; '.join(diffs)}. Build the model with the checkpoint's values."
        )
    if any(s.startswith("normalize.") for s in shapes):
        return "The normalisation differs in shape: the checkpoint was trained on another dataset or image size."
    return f"Both look like {have['name']!r}; the checkpoint may come from a different variant of it."


def guess_architecture(sd: Mapping[str, torch.Tensor]) -> dict[str, object] | None:
    """Which zoo architecture a network state_dict looks like: {"name", "num_classes", "in_channels", ...},
    or None. Heuristic, from parameter names and shapes; used for error messages."""

    def shape(key: str) -> tuple[int, ...] | None:
        return tuple(sd[key].shape) if key in sd else None

    if shape("fc1.weight") and shape("fc3.weight") and shape("conv1.weight"):
        return {
            "name": "lenet",
            "num_classes": shape("fc3.weight")[0],
            "in_channels": shape("conv1.weight")[1],
            "image_size": _lenet_image_size(shape("fc1.weight")[1]),
        }
    if shape("dense1.0.conv1.weight") and shape("linear.weight"):
        return _guess("densenet121", sd, "linear.weight")
    if shape("classifier.6.weight") and shape("features.0.weight"):
        num_convs = sum(
            1 for k, v in sd.items() if k.startswith("features.") and k.endswith(".weight") and v.dim() == 4
        )
        return _guess("vgg19" if num_convs == 16 else f"VGG with {num_convs} convolutions", sd, "classifier.6.weight")
    if shape("layer1.0.conv1.weight") and shape("linear.weight"):
        return _guess("resnet18", sd, "linear.weight")
    if shape("layer1.0.conv3.weight") and shape("fc.weight"):
        return _guess("resnet50", sd, "fc.weight")
    if shape("layer1.0.conv1.weight") and shape("fc.weight"):
        return _guess("resnet18_mnist", sd, "fc.weight")
    return None


def _lenet_image_size(fc1_inputs: int) -> int | str:
    """Smallest square input side giving LeNet's fc1 `16 * s * s` inputs (sides 4s+8 .. 4s+11 all do)."""
    side = math.isqrt(fc1_inputs // 16)
    return 4 * side + 8 if 16 * side * side == fc1_inputs else f"{fc1_inputs} fc1 inputs"


def _guess(name: str, sd: Mapping[str, torch.Tensor], head: str) -> dict[str, object]:
    stem = "features.0.weight" if "features.0.weight" in sd else "conv1.weight"
    in_channels = sd[stem].shape[1] if stem in sd else None
    return {"name": name, "num_classes": sd[head].shape[0], "in_channels": in_channels}
