"""Attacks as small objects independent of training code (pure PyTorch).

- `SubspaceDeepFool`: margins along subspaces (the paper's measurement), batched over samples and subspaces.
- `L2PGD`: L2 projected gradient ascent for adversarial training and robust accuracy.
- `dykstra_projection`, `Projection`: exact projection onto {L2 ball} ∩ {valid images} (also after a flip).
"""

from attacks.deepfool import MarginResult, RowResult, SubspaceDeepFool
from attacks.dykstra import Projection, dykstra_projection, project_box, project_flipped_box, project_l2_ball
from attacks.pgd import L2PGD

__all__ = [
    "L2PGD",
    "MarginResult",
    "Projection",
    "RowResult",
    "SubspaceDeepFool",
    "dykstra_projection",
    "project_box",
    "project_flipped_box",
    "project_l2_ball",
]
