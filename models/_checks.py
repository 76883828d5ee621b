"""Shared input checks for the zoo networks."""

from __future__ import annotations

import torch
from torch import nn


def check_flat_features(flat: torch.Tensor, head: nn.Linear, network: str, expected_input: str) -> None:
    """Raise a clear error when the flattened features `flat: [B, F]` do not fit the linear head.

    The release's networks use fixed pooling, so only some input sizes work; without this check
    the failure is an opaque matrix-multiplication error.
    """
    if flat.shape[1] != head.in_features:
        raise ValueError(
            f"{network}: the input gives {flat.shape[1]} features before the classifier, which expects "
            f"{head.in_features}; this network takes {expected_input} images"
        )
