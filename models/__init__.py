"""Model zoo of the release's architectures, their normalisation layer, checkpoint reading and strict loading."""

from .checkpoint import (
    CheckpointInfo,
    CheckpointReadError,
    UntrustedCheckpointError,
    checkpoint_kind,
    file_sha256,
    inspect_checkpoint,
    read_checkpoint,
)
from .loading import CheckpointMismatchError, guess_architecture, load_weights
from .normalization import Normalize, NormalizedModel
from .zoo import MODEL_NAMES, MODEL_SPECS, ModelSpec, build_model

__all__ = [
    "MODEL_NAMES",
    "MODEL_SPECS",
    "CheckpointInfo",
    "CheckpointMismatchError",
    "CheckpointReadError",
    "ModelSpec",
    "Normalize",
    "NormalizedModel",
    "UntrustedCheckpointError",
    "build_model",
    "checkpoint_kind",
    "file_sha256",
    "guess_architecture",
    "inspect_checkpoint",
    "load_weights",
    "read_checkpoint",
]
