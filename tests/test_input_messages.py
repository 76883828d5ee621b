"""Bad sample and subspace settings name the Python parameter and the command-line flag alike."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.errors import InputError
from margins.inputs import SubspaceSpec, choose_indices, make_subspaces

TOY = SimpleNamespace(image_shape=(1, 8, 8), subspace_block=4, subspace_step=1, name="toy")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: choose_indices(5, 0, None, 2, "toy"), r"num_samples=5 (--num-samples) is not in [1, 2]"),
        (lambda: make_subspaces(SubspaceSpec("dct", dim=9), TOY), "subspace_dim=9 (--subspace-dim) does not fit"),
        (lambda: make_subspaces(SubspaceSpec("dct", step=0), TOY), "subspace_step=0 (--subspace-step) must be >= 1"),
        (lambda: make_subspaces(SubspaceSpec("random", count=0), TOY), "count=0 (--count)"),
        (lambda: make_subspaces(SubspaceSpec("full", dim=2), TOY), "subspace_dim/subspace_step (--subspace-dim/"),
        (lambda: make_subspaces(SubspaceSpec("wavelet"), TOY), "'wavelet' for subspace (--subspace)"),
    ],
)
def test_errors_name_parameter_and_flag(call, message):
    with pytest.raises(InputError) as error:
        call()
    assert message in str(error.value)
