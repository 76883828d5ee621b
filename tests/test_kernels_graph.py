"""Graph rewrites of the engine's working copy (attacks/kernels/graph.py): batch norms folded into the convolution
before them, max-pools on the pooling kernels with their ReLUs merged in; the same function."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from attacks.deepfool import SubspaceDeepFool
from attacks.kernels import prepare_model
from attacks.kernels.graph import count_batchnorms, fold_batchnorms, rewrite_max_pools, trace
from attacks.kernels.pooling import max_pool2d, max_pool2d_relu
from frequency import DCTBlockSubspaces
from models import Normalize, NormalizedModel, build_model

F64 = {"dtype": torch.float64}


def randomize_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.2, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model.eval()


def mnist_resnet() -> nn.Module:
    norm = Normalize(0.13, 0.31, (1, 28, 28))
    return randomize_statistics(NormalizedModel(norm, build_model("resnet18_mnist"))).to(**F64)


def output_and_input_gradient(model: nn.Module, x: torch.Tensor, seed: torch.Tensor):
    point = x.clone().requires_grad_(True)
    out = model(point)
    (grad,) = torch.autograd.grad(out, point, seed)
    return out.detach(), grad


def functions(graph: fx.GraphModule) -> list:
    return [node.target for node in graph.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize(
    "name,shape,all_folded",
    [
        ("resnet18_mnist", (1, 28, 28), True),
        ("resnet18", (3, 32, 32), True),
        ("densenet121", (3, 32, 32), False),  # DenseNet's BN-ReLU-conv order leaves the BNs that follow a concat
        ("resnet50", (3, 32, 32), True),
    ],
)
def test_folding_keeps_the_function_of_zoo_models(name, shape, all_folded):
    net = build_model(name)
    model = randomize_statistics(NormalizedModel(Normalize(0.4, 0.25, shape), net)).to(**F64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = count_batchnorms(model)
    folded = fold_batchnorms(trace(model))
    assert before > 0 and (count_batchnorms(folded) == 0 if all_folded else 0 < count_batchnorms(folded) < before)
    assert any(type(m) is Normalize for m in folded.modules())  # kept as a module for the stem split
    x, seed = torch.rand(2, *shape, **F64), torch.randn(2, 10 if name != "resnet50" else 1000, **F64)
    got, expected = output_and_input_gradient(folded, x, seed), output_and_input_gradient(model, x, seed)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-9, atol=1e-10 * expected[1].abs().max().item())
    assert count_batchnorms(model) == before  # the traced model shares modules with the graph: untouched
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


class SharedConvOutput(nn.Module):
    """A conv whose output feeds its batch norm and a second branch: folding would change the second branch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)
        self.head = nn.Linear(2 * 4 * 6 * 6, 10)

    def forward(self, x):
        h = self.conv(x)
        return self.head(torch.cat([self.bn(h), h], 1).flatten(1))


class StandardisedConv(nn.Conv2d):
    """Its own forward: traced through, no longer a Conv2d module to fold into."""

    def forward(self, x):
        return self._conv_forward(x, (self.weight - self.weight.mean()) / self.weight.std(), self.bias)


def unfoldable(kind: str) -> nn.Module:
    torch.manual_seed(1)
    if kind == "shared_conv_output":
        return randomize_statistics(SharedConvOutput()).to(**F64)
    if kind == "conv_subclass":
        layers = [StandardisedConv(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten()]
    else:  # no running statistics: eval mode normalises with the batch's own
        layers = [nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.Flatten()]
    return randomize_statistics(nn.Sequential(*layers)).to(**F64)


@pytest.mark.parametrize("kind", ["shared_conv_output", "conv_subclass", "batch_statistics"])
def test_batch_norms_that_cannot_be_folded_are_kept(kind):
    model = unfoldable(kind)
    folded = fold_batchnorms(trace(model))
    assert count_batchnorms(folded) == 1
    x = torch.rand(3, 1, 8, 8, **F64)
    assert torch.equal(folded(x), model(x))


def test_training_mode_batch_norms_are_not_folded():
    model = randomize_statistics(build_model("resnet18_mnist")).to(**F64).train()
    assert count_batchnorms(fold_batchnorms(trace(model))) == 20


def test_a_training_mode_model_is_prepared_as_its_eval_mode_copy_with_batch_norms_folded():
    model = mnist_resnet().train()
    prepared = prepare_model(model, "cpu", torch.float64, ("fold_batchnorm",))
    assert count_batchnorms(prepared.module) == 0 and model.training and count_batchnorms(model) == 20
    x = torch.rand(2, 1, 28, 28, **F64)
    with torch.no_grad():
        expected = model.eval()(x)
        torch.testing.assert_close(prepared(x), expected, rtol=1e-10, atol=1e-12)


def test_nothing_to_fold_returns_the_graph_itself():
    graph = trace(build_model("lenet").eval())
    assert fold_batchnorms(graph) is graph


@pytest.mark.parametrize("fast", [True, False])
def test_lenets_functional_relus_and_pools_are_merged_with_the_same_bits(fast):
    model = NormalizedModel(Normalize(0.13, 0.31, (1, 28, 28)), build_model("lenet")).eval().to(**F64)
    graph = trace(copy.deepcopy(model))
    assert rewrite_max_pools(graph, fast=fast, merge_relus=True)[0] == 2
    targets = functions(graph)
    assert targets.count(max_pool2d_relu) == 2 and F.max_pool2d not in targets
    assert targets.count(F.relu) == 2  # the classifier's ReLUs, read by linear layers: not merged
    assert all(n.kwargs["fast"] == fast for n in graph.graph.nodes if n.target is max_pool2d_relu)
    x, seed = torch.rand(3, 1, 28, 28, **F64), torch.randn(3, 10, **F64)
    got, expected = output_and_input_gradient(graph, x, seed), output_and_input_gradient(model, x, seed)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    with torch.no_grad():
        assert torch.equal(graph(x), expected[0])  # the label check's path


def test_pools_alone_run_the_pooling_kernel_and_nothing_is_rewritten_without_a_kernel():
    model = build_model("lenet").eval().to(**F64)
    graph = trace(copy.deepcopy(model))
    assert rewrite_max_pools(graph, fast=True, merge_relus=False)[0] == 2
    assert functions(graph).count(max_pool2d) == 2 and functions(graph).count(F.relu) == 4
    x, seed = torch.rand(2, 1, 28, 28, **F64), torch.randn(2, 10, **F64)
    got, expected = output_and_input_gradient(graph, x, seed), output_and_input_gradient(model, x, seed)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    untouched = trace(copy.deepcopy(model))
    code = untouched.code
    assert rewrite_max_pools(untouched, fast=False, merge_relus=False)[0] == 0 and untouched.code == code


@pytest.mark.parametrize("fast", [True, False])
def test_resnets_in_place_stem_relu_and_pool_module_are_merged_with_the_same_bits(fast):
    model = mnist_resnet()
    graph = trace(copy.deepcopy(model))
    assert rewrite_max_pools(graph, fast=fast, merge_relus=True)[0] == 1
    nodes = {node.target: node for node in graph.graph.nodes}
    assert "net.relu" not in nodes and "net.maxpool" not in nodes  # the stem's ReLU and pool: one call
    assert nodes[max_pool2d_relu].args[0].target == "net.bn1"
    assert model.net.relu.inplace and isinstance(model.net.maxpool, nn.MaxPool2d)  # the caller's model as it was
    x, seed = torch.rand(3, 1, 28, 28, **F64), torch.randn(3, 10, **F64)
    got, expected = output_and_input_gradient(graph, x, seed), output_and_input_gradient(model, x, seed)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


class ReluInputReadTwice(nn.Module):
    """The in-place ReLU's write is seen by a second reader of its input: it must stay in place."""

    def __init__(self, inplace: bool = True):
        super().__init__()
        self.conv, self.relu, self.pool = nn.Conv2d(1, 4, 3), nn.ReLU(inplace=inplace), nn.MaxPool2d(2)

    def forward(self, x):
        h = self.conv(x)
        pooled = self.pool(self.relu(h))
        return torch.cat([pooled.flatten(1), h.flatten(1)], 1)  # in place: h holds relu(h) here


class ReluOutputReadTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.relu, self.pool = nn.Conv2d(1, 4, 3), nn.ReLU(inplace=True), nn.MaxPool2d(2)

    def forward(self, x):
        r = self.relu(self.conv(x))
        return torch.cat([self.pool(r).flatten(1), r.flatten(1)], 1)


class OpInBetween(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)

    def forward(self, x):
        return F.max_pool2d(F.relu(self.conv(x)) * 2.0, 2).flatten(1)


@pytest.mark.parametrize(
    "model,merged",
    [
        (ReluInputReadTwice(), False),
        (ReluOutputReadTwice(), False),
        (OpInBetween(), False),
        (ReluInputReadTwice(inplace=False), True),  # out of place: its input is unchanged for the other reader
    ],
    ids=["in_place_input_read_twice", "output_read_twice", "op_in_between", "out_of_place_input_read_twice"],
)
def test_a_relu_is_merged_only_where_the_pool_is_its_only_effect(model, merged):
    torch.manual_seed(0)
    model = model.eval().to(**F64)
    x = torch.rand(2, 1, 9, 9, **F64)
    graph = trace(copy.deepcopy(model))
    assert rewrite_max_pools(graph, fast=False, merge_relus=True)[0] == int(merged)
    assert (max_pool2d_relu in functions(graph)) == merged
    seed = torch.randn_like(model(x))
    got, expected = output_and_input_gradient(graph, x, seed), output_and_input_gradient(model, x, seed)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def test_functional_in_place_relus_before_pools_are_merged():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.pool = nn.Conv2d(1, 4, 3), nn.MaxPool2d(2)

        def forward(self, x):
            h = F.max_pool2d(F.relu(self.conv(x), inplace=True), 2)
            h = torch.max_pool2d(torch.relu_(h * 2), 2)
            return self.pool((h - 0.1).relu_()).flatten(1)

    torch.manual_seed(0)
    model = Functional().eval().to(**F64)
    graph = trace(copy.deepcopy(model))
    assert rewrite_max_pools(graph, fast=True, merge_relus=True)[0] == 3
    targets = functions(graph)
    assert targets.count(max_pool2d_relu) == 3 and torch.relu_ not in targets and F.relu not in targets
    assert not any(node.op == "call_method" and node.target == "relu_" for node in graph.graph.nodes)
    x, seed = torch.rand(2, 1, 22, 22, **F64), torch.randn(2, 4 * 2 * 2, **F64)
    got, expected = output_and_input_gradient(graph, x, seed), output_and_input_gradient(model, x, seed)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


class Untraceable(nn.Module):
    """Branches on a tensor's value: `torch.fx` cannot trace it."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.body = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Conv2d(6, 4, 3)

    def forward(self, x):
        h = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        h = self.body(h).flatten(1)
        return h[:, :10] if h.sum() > 0 else -h[:, :10]


def test_an_untraceable_model_gets_the_convolution_kernels_only():
    torch.manual_seed(0)
    model = randomize_statistics(Untraceable()).to(**F64)
    assert trace(model) is None
    prepared = prepare_model(model, "cpu", torch.float64, "auto")
    assert type(prepared.module) is Untraceable and prepared.stem is None
    assert count_batchnorms(prepared.module) == 1  # nothing folded
    assert "forward" in vars(prepared.module.conv) and "forward" in vars(prepared.module.body)
    assert not any("forward" in vars(m) for m in model.modules())
    x = torch.rand(4, 1, 8, 8, **F64)
    family = DCTBlockSubspaces((1, 8, 8), 4, 4)
    result = SubspaceDeepFool(batch_size=3)(prepared, x, family)
    plain = SubspaceDeepFool(batch_size=3, kernels="off")(model, x, family)
    torch.testing.assert_close(result.margins, plain.margins, rtol=1e-10, atol=0)
    assert torch.equal(result.iterations, plain.iterations)


def test_prepared_models_list_only_the_kernels_that_apply():
    lenet = NormalizedModel(Normalize(0.1307, 0.3081, (1, 28, 28)), build_model("lenet")).eval()
    kernels = prepare_model(lenet, "cpu").kernels  # no batch norm; its 1-channel stem splits
    assert kernels == {"fast_maxpool", "pool_then_relu", "native_stem_grad", "unroll_small_convs", "stem_projection"}
    resnet = prepare_model(mnist_resnet().eval(), "cpu").kernels  # 64-channel stem after folding: no split
    assert {"fold_batchnorm", "fast_maxpool", "pool_then_relu", "native_stem_grad"} <= resnet
    assert prepare_model(lenet, "cpu", kernels="off").kernels == frozenset()
    assert prepare_model(lenet, "cpu", kernels=["fold_batchnorm"]).kernels == frozenset()  # nothing to fold
