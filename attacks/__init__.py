"""Attacks as small objects independent of training code (pure PyTorch).

- `SubspaceDeepFool`: margins along subspaces (the paper's measurement), batched over samples and subspaces;
  `precision_record` describes its arithmetic for result files; `model_device` is the device of a model.
- `L2PGD`: L2 projected gradient ascent for adversarial training and robust accuracy.
- `exact_projection` (closed form), `dykstra_projection` (Dykstra's algorithm), `Projection`: the projection onto
  {L2 ball} ∩ {valid images} (also after a flip).
"""

from attacks.deepfool import MarginResult, PassStats, RowResult, SubspaceDeepFool, model_device, precision_record
from attacks.dykstra import (
    Projection,
    dykstra_projection,
    exact_projection,
    project_box,
    project_flipped_box,
    project_l2_ball,
)
from attacks.pgd import L2PGD

__all__ = [
    "L2PGD",
    "MarginResult",
    "PassStats",
    "Projection",
    "RowResult",
    "SubspaceDeepFool",
    "dykstra_projection",
    "exact_projection",
    "model_device",
    "precision_record",
    "project_box",
    "project_flipped_box",
    "project_l2_ball",
]
