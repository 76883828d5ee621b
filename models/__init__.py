"""Model zoo of the release's architectures, their normalisation layer, and strict checkpoint loading."""

from .loading import CheckpointMismatchError, UntrustedCheckpointError, guess_architecture, load_weights
from .normalization import Normalize, NormalizedModel
from .zoo import MODEL_NAMES, MODEL_SPECS, ModelSpec, build_model

__all__ = [
    "MODEL_NAMES",
    "MODEL_SPECS",
    "CheckpointMismatchError",
    "ModelSpec",
    "Normalize",
    "NormalizedModel",
    "UntrustedCheckpointError",
    "build_model",
    "guess_architecture",
    "load_weights",
]
