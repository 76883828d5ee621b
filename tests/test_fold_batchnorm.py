"""Batch norm folded into the layer before it (attacks/fold_batchnorm.py): the same function, on a copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attacks.fold_batchnorm import count_batchnorms, fold_batchnorms
from models import Normalize, NormalizedModel, build_model

F64 = {"dtype": torch.float64}


def randomize_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.2, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


class SharedConvOutput(nn.Module):
    """A conv whose output feeds its batch norm and a second branch: folding would change the second branch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        self.head = nn.Linear(2 * 4 * 6 * 6, 10)

    def forward(self, x):
        h = self.conv(x)
        return self.head(torch.cat([self.bn(h), h], 1).flatten(1))


class ValueControlFlow(nn.Module):
    """Branches on a tensor's value: `torch.fx` cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        h = self.bn(self.conv(x))
        return h.flatten(1)[:, :10] if h.sum() > 0 else -h.flatten(1)[:, :10]


def test_resnet18_folds_every_batch_norm_and_computes_the_same_function():
    norm = Normalize(0.13, 0.31, (1, 28, 28))
    model = randomize_statistics(NormalizedModel(norm, build_model("resnet18_mnist"))).to(**F64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorms(model)
    assert count_batchnorms(model) == 20 and count_batchnorms(folded) == 0
    assert any(isinstance(m, Normalize) for m in folded.modules())  # kept as a module for the stem projection
    x = torch.rand(4, 1, 28, 28, **F64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-12)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # the model itself is untouched
    assert count_batchnorms(model) == 20


def test_nothing_to_fold_returns_the_model_itself():
    lenet = build_model("lenet").eval()
    assert fold_batchnorms(lenet) is lenet  # no batch norm
    shared = randomize_statistics(SharedConvOutput())
    assert fold_batchnorms(shared) is shared  # the conv's output is read twice
    untraceable = randomize_statistics(ValueControlFlow())
    assert fold_batchnorms(untraceable) is untraceable
    training = randomize_statistics(build_model("resnet18_mnist")).train()
    assert fold_batchnorms(training) is training  # training-mode batch norm uses batch statistics


def test_a_conv_subclass_with_its_own_forward_is_not_folded():
    class Standardised(nn.Conv2d):
        def forward(self, x):
            return self._conv_forward(x, (self.weight - self.weight.mean()) / self.weight.std(), self.bias)

    torch.manual_seed(1)
    model = randomize_statistics(nn.Sequential(Standardised(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten())).to(**F64)
    folded = fold_batchnorms(model)
    assert folded is model  # traced through, its convolution is no longer a Conv2d module: nothing to fold into
    x = torch.rand(3, 1, 6, 6, **F64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,size", [("resnet18", 32), ("densenet121", 32), ("resnet50", 64)])
def test_zoo_models_keep_their_function_when_folded(name, size):
    model = randomize_statistics(build_model(name)).to(**F64)
    folded = fold_batchnorms(model)
    assert count_batchnorms(folded) < count_batchnorms(model)  # DenseNet's BN-ReLU-conv order leaves some
    x = torch.rand(2, 3, size, size, **F64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-9, atol=1e-10)
