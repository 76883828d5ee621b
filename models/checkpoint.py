"""The one place that reads checkpoint files: safe loading, what a file is (and is not), kind detection.

Kinds (recognised from the content, `checkpoint_kind`):
- ``lightning``: this project's Lightning checkpoint, `{"state_dict": {...}, "hyper_parameters", ...}`;
- ``madrylab``: a MadryLab robustness checkpoint, `{"model": {"module.model.*", ...}, "epoch", ...}`;
- ``state_dict``: a raw state_dict (the release's `model.t7`, torchvision weights).

Files are read with `torch.load(weights_only=True)`; `trusted_pickle=True` allows pickled Python objects (can run
code: trusted files only). Every unreadable file raises a `CheckpointReadError` whose one-line message says what
the file is not (empty, text, truncated archive, not a checkpoint at all).
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.errors import InputError

ZIP_MAGIC = b"PK\x03\x04"
PICKLE_PROTOCOL_2PLUS = b"\x80"


class CheckpointReadError(InputError):
    """The file cannot be read as a PyTorch checkpoint; the message says what it is not."""


class CheckpointNotFoundError(CheckpointReadError, FileNotFoundError):
    """No file at the given path."""


class UntrustedCheckpointError(InputError, pickle.UnpicklingError):
    """The file holds pickled Python objects, which `torch.load(weights_only=True)` refuses to run."""


# what torch's weights-only unpickler says when it refuses an object it does not allow (not a damaged file)
_NEEDS_TRUST = re.compile(r"not an allowed global|whose module \S+ is blocked|call reduce for|Can only (build|create)")


def needs_trust(err: pickle.UnpicklingError) -> bool:
    """Whether torch's weights-only load refused the file for objects it does not allow (a function to call, a
    class outside its allowlist), not for damaged bytes."""
    return bool(_NEEDS_TRUST.search(str(err)))


def untrusted_pickle_error(path: str | Path, flag: str = "--trusted-pickle") -> UntrustedCheckpointError:
    """The one line refusing a checkpoint whose pickle needs trust: what it is, why it is not loaded, and `flag`,
    the command's option that allows it (evaluate_margin.py's --trusted-pickle by default)."""
    return UntrustedCheckpointError(
        f"{path} is a pickle that needs trust: it holds Python objects besides tensors, and unpickling them can run "
        f"arbitrary code, so it is not loaded; if (and only if) you trust this file (e.g. a MadryLab robustness "
        f"checkpoint), pass {flag}"
    )


@dataclass
class CheckpointInfo:
    """What a checkpoint says about itself, read once before the model is built."""

    path: Path
    kind: str  # "lightning" | "madrylab" | "state_dict"
    model_hparams: dict[str, Any] = field(default_factory=dict)
    data_hparams: dict[str, Any] = field(default_factory=dict)
    carries_normalization: bool = False
    content: object = None  # the loaded object (weights on the CPU)


def read_checkpoint(path: str | Path, trusted_pickle: bool = False, map_location: Any = "cpu") -> object:
    """`torch.load` of `path` with one-line errors: FileNotFoundError-like InputError, CheckpointReadError,
    UntrustedCheckpointError."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".ckpt", ".t7", ".pt", ".pth"))[:3]
        hint = f" (it holds {', '.join(inside)})" if inside else ""
        raise CheckpointNotFoundError(f"checkpoint {path} is a directory{hint}; pass the checkpoint file itself")
    if not path.is_file():
        raise CheckpointNotFoundError(f"checkpoint file not found: {path} (resolved: {path.resolve()})")
    what = _what_file_is_not(path)
    if what:
        raise CheckpointReadError(f"{path} is not a PyTorch checkpoint: {what}")
    try:
        return torch.load(path, map_location=map_location, weights_only=not trusted_pickle)
    except pickle.UnpicklingError as err:
        if not trusted_pickle and needs_trust(err):
            raise untrusted_pickle_error(path, "--trusted-pickle (trusted_pickle=True)") from err
        detail = _unpickler_detail(str(err))
        raise CheckpointReadError(f"{path} is not a readable PyTorch checkpoint (corrupt pickle: {detail})") from err
    except Exception as err:  # noqa: BLE001 - torch.load on foreign bytes fails in many ways; all mean "bad file"
        raise CheckpointReadError(
            f"{path} is not a readable PyTorch checkpoint: it looks like one but is truncated or corrupt "
            f"({type(err).__name__}: {_one_line(err)[:160]})"
        ) from err


def _what_file_is_not(path: Path) -> str:
    """'' if `path` may be a torch.save file, else a phrase saying what it is instead."""
    size = path.stat().st_size
    if size == 0:
        return "it is an empty file (0 bytes)"
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as archive:
                archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError):
            return f"it is a truncated or corrupt zip archive ({size} bytes), not a complete torch.save file"
        return ""
    if head.startswith(PICKLE_PROTOCOL_2PLUS):
        return ""  # legacy (pre-1.6) torch.save format: a pickle stream
    if _is_text(head):
        first = head.decode("utf-8", errors="replace").strip().splitlines()[0][:60] if head.strip() else ""
        return f"it is a text file (first line: {first!r}), not a torch.save archive"
    return (
        f"it is neither a torch.save zip archive nor a pickle ({size} bytes of unrecognised binary data "
        f"starting with {head[:8].hex(' ')})"
    )


def _is_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return all(c.isprintable() or c in "\n\r\t\f" for c in text)


def _unpickler_detail(message: str) -> str:
    """The informative part of torch's weights-only error (after 'WeightsUnpickler error:'), one line."""
    _, sep, rest = message.partition("WeightsUnpickler error:")
    text = rest if sep else message
    return " ".join(text.split("Check the documentation of torch.load")[0].split())[:200]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def is_tensor_dict(d: object) -> bool:
    """A non-empty mapping of str -> tensor (a state_dict)."""
    return (
        isinstance(d, Mapping)
        and len(d) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in d.items())
    )


def checkpoint_kind(obj: object, path: Path) -> tuple[str, Mapping[str, torch.Tensor]]:
    """`(kind, weights)` of a loaded checkpoint object (see the module docstring); CheckpointReadError otherwise."""
    if isinstance(obj, nn.Module):  # a whole pickled model (only with trusted_pickle)
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{path} holds a {type(obj).__name__}, not a state_dict or a checkpoint dict")
    if isinstance(obj.get("state_dict"), Mapping):
        return "lightning", obj["state_dict"]
    if is_tensor_dict(obj.get("model")):
        return "madrylab", obj["model"]
    if is_tensor_dict(obj):
        return "state_dict", obj
    keys = ", ".join(map(str, list(obj)[:10]))
    raise CheckpointReadError(
        f"{path} is neither a state_dict nor a known checkpoint (Lightning 'state_dict', MadryLab 'model'); "
        f"its top-level keys are: {keys}"
    )


def inspect_checkpoint(path: str | Path, trusted_pickle: bool = False) -> CheckpointInfo:
    """Kind, hyperparameters and whether `path` holds its own normalisation (the file is read once)."""
    path = Path(path).expanduser()
    obj = read_checkpoint(path, trusted_pickle)
    kind, weights = checkpoint_kind(obj, path)
    carries = any(str(k).endswith(("normalize.mean", "normalizer.new_mean")) for k in weights)
    hparams = obj if isinstance(obj, Mapping) else {}
    return CheckpointInfo(
        path=path,
        kind=kind,
        model_hparams=_public(hparams.get("hyper_parameters")),
        data_hparams=_public(hparams.get("datamodule_hyper_parameters")),
        carries_normalization=carries,
        content=obj,
    )


def _public(hparams: object) -> dict[str, Any]:
    """A hyperparameter dict without the CLI's bookkeeping keys (`_class_path`, `_instantiator`)."""
    if not isinstance(hparams, Mapping):
        return {}
    return {str(k): v for k, v in hparams.items() if not str(k).startswith("_")}


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
