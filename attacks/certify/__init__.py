"""Certified lower bounds on the margin along subspaces (pure PyTorch, batched over (sample, subspace) rows).

- `SubspaceCertifier`: the margin estimator (`margins` = certified lower bounds, `settings()["bound"] == "lower"`).
- `graph`: the model as operations bound propagation understands (`network_ops`, `UnsupportedLayerError`).
- `bounds`: linear bound propagation over the L2 ball of subspace coordinates (CROWN relaxations, rounding).
- `search`: the certified radius of each row (closed form and bracketing search; alpha-CROWN slopes).
"""

from attacks.certify.certifier import CERTIFY_VERSION, SubspaceCertifier, certify_network
from attacks.certify.graph import UnsupportedLayerError

__all__ = ["CERTIFY_VERSION", "SubspaceCertifier", "UnsupportedLayerError", "certify_network"]
