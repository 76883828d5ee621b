"""Rewrites of a model under attack (attacks/rewrite_graph.py): batch norm folded into the layer before it,
out-of-place ReLUs before max-pools, a channels-last body; the same function, on a copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attacks.fast_functions import fast_functions
from attacks.rewrite_graph import count_batchnorms, fold_batchnorms, rewrite_for_attack
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


def inplace_relus_before_pools(model: nn.Module) -> int:
    traced = model if isinstance(model, torch.fx.GraphModule) else torch.fx.symbolic_trace(model)
    modules = dict(traced.named_modules())
    count = 0
    for node in traced.graph.nodes:
        module = modules.get(node.target) if node.op == "call_module" else None
        if isinstance(module, nn.ReLU) and module.inplace:
            count += any(isinstance(modules.get(user.target), nn.MaxPool2d) for user in node.users)
    return count


def test_resnet_stem_relu_runs_out_of_place_and_the_pool_then_relu_path_takes_it():
    norm = Normalize(0.13, 0.31, (1, 28, 28))
    model = randomize_statistics(NormalizedModel(norm, build_model("resnet18_mnist"))).to(**F64)
    rewritten = rewrite_for_attack(model, fold_batchnorm=False, relu_before_pool=True)
    assert inplace_relus_before_pools(rewritten) == 0 and count_batchnorms(rewritten) == 20
    assert model.net.relu.inplace  # the caller's model keeps its in-place ReLU
    x = torch.rand(3, 1, 28, 28, **F64, requires_grad=True)
    seed = torch.randn(3, 10, **F64)
    (expected,) = torch.autograd.grad(model(x), x, seed)
    with fast_functions(batchnorm=False, maxpool=True):
        out = rewritten(x)
        (got,) = torch.autograd.grad(out, x, seed)
    assert out.grad_fn is not None and "PoolThenRelu" in str(_backward_names(out))
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def _backward_names(tensor: torch.Tensor) -> set[str]:
    names, stack, seen = set(), [tensor.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return names


class ReluInputReadTwice(nn.Module):
    """The in-place ReLU's write is seen by a second reader of its input: it must stay in place."""

    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.pool = nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)

    def forward(self, x):
        h = self.conv(x)
        pooled = self.pool(self.relu(h))
        return torch.cat([pooled.flatten(1), h.flatten(1)], 1)  # h holds relu(h) after the in-place write


class ReluOutputReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.pool = nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)

    def forward(self, x):
        r = self.relu(self.conv(x))
        return torch.cat([self.pool(r).flatten(1), r.flatten(1)], 1)


@pytest.mark.parametrize("cls", [ReluInputReadTwice, ReluOutputReadTwice])
def test_relus_whose_in_place_write_is_visible_stay_in_place(cls):
    torch.manual_seed(0)
    model = cls().eval().to(**F64)
    assert rewrite_for_attack(model, fold_batchnorm=False, relu_before_pool=True) is model


def test_functional_inplace_relu_before_a_functional_pool_runs_out_of_place():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool = nn.Conv2d(1, 4, 3), nn.MaxPool2d(2)  # a pool module, so the rewrite is tried

        def forward(self, x):
            h = F.max_pool2d(F.relu(self.conv(x), inplace=True), 2)
            return self.pool(torch.relu_(h * 2)).flatten(1)

    torch.manual_seed(0)
    model = Functional().eval().to(**F64)
    rewritten = rewrite_for_attack(model, fold_batchnorm=False, relu_before_pool=True)
    targets = [node.target for node in rewritten.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.relu) == 2 and torch.relu_ not in targets
    x = torch.rand(2, 1, 10, 10, **F64)
    torch.testing.assert_close(rewritten(x), model(x), rtol=0, atol=0)


def test_channels_last_body_keeps_the_stem_channels_first_and_the_function():
    norm = Normalize(0.13, 0.31, (1, 28, 28))
    model = randomize_statistics(NormalizedModel(norm, build_model("resnet18_mnist"))).to(**F64)
    rewritten = rewrite_for_attack(model, channels_last_body=True)
    convs = {name: m for name, m in rewritten.named_modules() if isinstance(m, nn.Conv2d)}
    stem = convs.pop("net.conv1")
    assert stem.in_channels == 1 and stem.weight.is_contiguous()
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs.values())
    assert not model.net.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)  # untouched
    x = torch.rand(4, 1, 28, 28, **F64)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(x), model(x), rtol=1e-10, atol=1e-12)


def test_channels_last_body_applies_to_models_torch_fx_cannot_trace():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.body = nn.Conv2d(1, 16, 3), nn.Conv2d(16, 4, 3)

        def forward(self, x):
            h = self.body(torch.relu(self.stem(x)))
            return h.flatten(1) if h.sum() > 0 else -h.flatten(1)

    torch.manual_seed(0)
    model = Untraceable().eval().to(**F64)
    rewritten = rewrite_for_attack(model, channels_last_body=True)
    assert rewritten is not model and type(rewritten) is Untraceable
    assert rewritten.body.weight.is_contiguous(memory_format=torch.channels_last)
    assert not model.body.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.rand(2, 1, 8, 8, **F64)
    torch.testing.assert_close(rewritten(x), model(x), rtol=1e-12, atol=1e-12)


def test_a_channels_last_working_copy_has_its_batch_norms_folded_too():
    from attacks.deepfool import _working_model

    model = randomize_statistics(build_model("resnet18_mnist")).to(**F64)
    work, _ = _working_model(model, None, torch.float64, channels_last=True)
    assert not work.training  # the channels-last wrapper keeps the model's eval mode
    folded = rewrite_for_attack(work)
    assert count_batchnorms(folded) == 0
    x = torch.rand(2, 1, 28, 28, **F64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-10, atol=1e-12)
