"""Attacks as small objects independent of training code (pure PyTorch).

- `SubspaceDeepFool`: margins along subspaces (the paper's measurement), batched over samples and subspaces; its
  device-specific kernels live in `attacks.kernels` (`prepare_model`).
- `SubspaceFMN`: a second margin estimator, the minimum-norm attack FMN constrained to each subspace (same interface).
- `SubspaceCertifier`: certified lower bounds on the same rows (linear bound propagation, `attacks.certify`).
- `MarginEstimator`: what both share around their algorithm (prepared model, checked rows, the grid of rows).
- `RowResult`, `MarginResult`: what margin estimators return; `precision_record` describes their arithmetic for
  result files; `model_device` is the device of a model.
- `L2PGD`: L2 projected gradient ascent for adversarial training and robust accuracy.
- `exact_projection` (closed form), `dykstra_projection` (Dykstra's algorithm), `Projection`: the projection onto
  {L2 ball} ∩ {valid images} (also after a flip).
"""

from attacks.certify import SubspaceCertifier
from attacks.common import MarginResult, RowResult, model_device, precision_record
from attacks.deepfool import SubspaceDeepFool
from attacks.dykstra import (
    Projection,
    dykstra_projection,
    exact_projection,
    project_box,
    project_flipped_box,
    project_l2_ball,
)
from attacks.estimator import MarginEstimator, PassObserver, PassStats
from attacks.fmn import SubspaceFMN
from attacks.kernels import KERNELS, PreparedModel, prepare_model
from attacks.pgd import L2PGD

__all__ = [
    "KERNELS",
    "L2PGD",
    "MarginEstimator",
    "MarginResult",
    "PassObserver",
    "PassStats",
    "PreparedModel",
    "Projection",
    "RowResult",
    "SubspaceCertifier",
    "SubspaceDeepFool",
    "SubspaceFMN",
    "dykstra_projection",
    "exact_projection",
    "model_device",
    "precision_record",
    "prepare_model",
    "project_box",
    "project_flipped_box",
    "project_l2_ball",
]
