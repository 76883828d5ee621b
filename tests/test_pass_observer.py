"""The estimators' pass observer: silent by default, and `PassStats` counts exactly the model passes that ran.

Reference: a layer inside the model that logs every forward pass it sees (whether gradients are on, how many
images), shared by the working copies the estimators prepare; the counts `PassStats` keeps (what the engine counted
for its benchmarks before the observer) must equal what that log shows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks.deepfool import SubspaceDeepFool
from attacks.estimator import MarginEstimator, PassObserver, PassStats
from attacks.fmn import SubspaceFMN
from frequency import DCTBlockSubspaces

F64 = {"dtype": torch.float64}
SHAPE = (1, 4, 4)


class PassLog(nn.Module):
    """The identity, logging `(gradients on, images)` per forward pass into a list its deep copies share."""

    def __init__(self, log: list[tuple[bool, int]]):
        super().__init__()
        self.log = log

    def __deepcopy__(self, memo) -> PassLog:
        return PassLog(self.log)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append((torch.is_grad_enabled(), x.shape[0]))
        return x


def logged_model(log: list[tuple[bool, int]]) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(PassLog(log), nn.Flatten(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 5))
    return net.to(**F64).eval()


def expected_passes(log: list[tuple[bool, int]], samples: int, batch_size: int) -> list[tuple[str, int]]:
    """The log as passes: the first ceil(samples / batch_size) no-grad forwards are the clean ones (the top
    classes come first), later no-grad forwards are checks, forwards with gradients on are gradient passes."""
    clean = -(-samples // batch_size)
    assert all(not grad for grad, _ in log[:clean])
    kinds = ["clean"] * clean + ["gradient" if grad else "check" for grad, _ in log[clean:]]
    return [(kind, images) for kind, (_, images) in zip(kinds, log, strict=True)]


ESTIMATORS = {
    "deepfool": lambda: SubspaceDeepFool(batch_size=3, kernels="off"),
    "deepfool_unshared_fixed": lambda: _switched(SubspaceDeepFool(batch_size=3, kernels="off")),
    "fmn": lambda: SubspaceFMN(steps=4, search_steps=3, batch_size=3, kernels="off"),
}


def _switched(attack: SubspaceDeepFool) -> SubspaceDeepFool:
    attack.share_first_step = attack.refill = False
    return attack


@pytest.mark.parametrize("make", ESTIMATORS.values(), ids=ESTIMATORS.keys())
def test_pass_stats_count_the_passes_the_model_ran(make):
    log: list[tuple[bool, int]] = []
    model, x = logged_model(log), torch.rand(4, *SHAPE, **F64, generator=torch.Generator().manual_seed(1))
    attack = make()
    stats = attack.observer = PassStats(attack.batch_size)
    result = attack(model, x, DCTBlockSubspaces(SHAPE, 2, 2))  # 2 subspaces: 8 rows in batches of 3
    assert (result.iterations > 1).any()
    passes = expected_passes(log, len(x), attack.batch_size)
    assert stats.passes == passes
    assert stats.clean_passes == sum(kind == "clean" for kind, _ in passes) == 2
    gradient = [images for kind, images in passes if kind == "gradient"]
    check = [images for kind, images in passes if kind == "check"]
    assert (stats.gradient_passes, stats.gradient_rows) == (len(gradient), sum(gradient))
    assert (stats.check_passes, stats.check_rows) == (len(check), sum(check))
    assert stats.routes == {"input": len(gradient)}  # the model as written: gradients at the input
    assert stats.fill == pytest.approx((sum(gradient) + sum(check)) / ((len(gradient) + len(check)) * 3))
    attack(model, x, DCTBlockSubspaces(SHAPE, 2, 2))
    assert stats.passes == passes * 2  # an observer counts every call it hears of


def test_the_default_observer_is_silent_and_an_attached_one_is_the_instances_own():
    log: list[tuple[bool, int]] = []
    model, x = logged_model(log), torch.rand(2, *SHAPE, **F64)
    counted, silent = SubspaceDeepFool(kernels="off"), SubspaceDeepFool(kernels="off")
    counted.observer = PassStats(counted.batch_size)
    silent(model, x)
    assert type(silent.observer) is PassObserver and type(MarginEstimator.observer) is PassObserver
    assert log and not hasattr(silent.observer, "passes")
    counted(model, x)
    assert counted.observer.clean_passes == 1 and counted.observer.gradient_passes > 0
    with pytest.raises(ValueError, match="unknown pass kind"):
        PassStats(1).model_pass("backward", 3)
