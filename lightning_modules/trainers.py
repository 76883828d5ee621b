"""A quiet Lightning `Trainer` for short fits run from code (tests, benchmarks)."""

from __future__ import annotations

import lightning as L


def quiet_trainer(**kwargs) -> L.Trainer:
    """A `Trainer` on one CPU device that logs, checkpoints and prints nothing, clipping gradient norms at 0.5 as the
    configs do; `kwargs` add to these settings or override them."""
    settings = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=0.5,
    )
    return L.Trainer(**{**settings, **kwargs})
