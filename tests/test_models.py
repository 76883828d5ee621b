"""Model zoo: layouts and parameter names of the release's checkpoints (the release's `model.t7` files), forward shapes,
and strict loading of raw / Lightning / MadryLab checkpoints."""

from __future__ import annotations

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from models import (
    MODEL_NAMES,
    CheckpointMismatchError,
    Normalize,
    NormalizedModel,
    UntrustedCheckpointError,
    build_model,
    guess_architecture,
    load_weights,
)


def shapes(model: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fresh(name: str, seed: int, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, **kwargs).eval()


# ---------------------------------------------------------------- layouts


def test_lenet_layout_exact():
    expected = {
        "conv1.weight": [6, 1, 5, 5],
        "conv1.bias": [6],
        "conv2.weight": [16, 6, 5, 5],
        "conv2.bias": [16],
        "fc1.weight": [120, 400],
        "fc1.bias": [120],
        "fc2.weight": [84, 120],
        "fc2.bias": [84],
        "fc3.weight": [10, 84],
        "fc3.bias": [10],
    }
    assert shapes(build_model("lenet")) == expected


def test_lenet_forward_matches_functional_definition():
    """conv1 (pad 2) -> ReLU -> pool -> conv2 -> ReLU -> pool -> fc1 -> ReLU -> fc2 -> ReLU -> fc3."""
    net = fresh("lenet", 0)
    p = dict(net.named_parameters())
    x = torch.randn(3, 1, 28, 28)
    h = F.max_pool2d(F.relu(F.conv2d(x, p["conv1.weight"], p["conv1.bias"], padding=2)), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, p["conv2.weight"], p["conv2.bias"])), 2).reshape(3, -1)
    h = F.relu(F.linear(h, p["fc1.weight"], p["fc1.bias"]))
    h = F.relu(F.linear(h, p["fc2.weight"], p["fc2.bias"]))
    expected = F.linear(h, p["fc3.weight"], p["fc3.bias"])
    torch.testing.assert_close(net(x), expected)


def test_lenet_image_size_32_for_synthetic_data():
    net = build_model("lenet", image_size=32)
    assert list(net.fc1.weight.shape) == [120, 16 * 6 * 6]  # 32 -> 16 -> 12 -> 6
    assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="image_size"):
        build_model("lenet")(torch.randn(1, 1, 32, 32))  # built for 28x28


def test_lenet_other_channels_and_classes():
    net = build_model("lenet", num_classes=3, in_channels=3)
    assert list(net.conv1.weight.shape) == [6, 3, 5, 5]
    assert net(torch.randn(2, 3, 28, 28)).shape == (2, 3)


def test_resnet18_cifar_layout():
    net = build_model("resnet18")
    s = shapes(net)
    assert s["conv1.weight"] == [64, 3, 3, 3] and "conv1.bias" not in s
    assert s["bn1.weight"] == [64]
    assert s["linear.weight"] == [10, 512] and s["linear.bias"] == [10]
    assert s["layer2.0.shortcut.0.weight"] == [128, 64, 1, 1]
    assert s["layer2.0.shortcut.1.running_mean"] == [128]
    assert not any(k.startswith("layer1.0.shortcut") for k in s)  # identity shortcut where shapes agree
    assert not any(k.startswith("fc.") for k in s)
    for layer, planes in zip(range(1, 5), (64, 128, 256, 512)):
        assert s[f"layer{layer}.1.conv2.weight"] == [planes, planes, 3, 3]
        assert f"layer{layer}.2.conv1.weight" not in s  # two blocks per layer
    # torchvision's ResNet-18 with the 3x3 stem (27*64 weights, not 147*64) and a 512->10 head
    tv = num_params(torchvision.models.resnet18(weights=None))
    assert num_params(net) == tv - 64 * 3 * 7 * 7 + 64 * 3 * 3 * 3 - (512 * 1000 + 1000) + (512 * 10 + 10)


def test_vgg19_layout():
    net = build_model("vgg19")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules())
    convs = [m for m in net.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == 16 and all(c.bias is not None and c.padding == (1, 1) for c in convs)
    assert isinstance(net.features[-1], nn.AvgPool2d)
    # walk the configuration: conv + ReLU takes two indices, a max pool one
    config = [64, 64, "M", 128, 128, "M"] + [256] * 4 + ["M"] + [512] * 4 + ["M"] + [512] * 4 + ["M"]
    s, index, channels, expected_params = shapes(net), 0, 3, 0
    for item in config:
        if item == "M":
            assert isinstance(net.features[index], nn.MaxPool2d)
            index += 1
        else:
            assert s[f"features.{index}.weight"] == [item, channels, 3, 3]
            expected_params += item * channels * 9 + item
            channels, index = item, index + 2
    assert [s[f"classifier.{i}.weight"] for i in (0, 3, 6)] == [[512, 512], [512, 512], [10, 512]]
    assert isinstance(net.classifier[2], nn.Dropout) and isinstance(net.classifier[5], nn.Dropout)
    expected_params += 2 * (512 * 512 + 512) + 512 * 10 + 10
    assert num_params(net) == expected_params


def test_densenet121_layout_and_forward():
    net = fresh("densenet121", 0)
    s = shapes(net)
    assert s["conv1.weight"] == [64, 3, 3, 3]
    planes = 64
    for stage, blocks in enumerate([6, 12, 24, 16], start=1):
        assert f"dense{stage}.{blocks - 1}.conv2.weight" in s and f"dense{stage}.{blocks}.bn1.weight" not in s
        assert s[f"dense{stage}.0.conv1.weight"] == [128, planes, 1, 1]
        assert s[f"dense{stage}.0.conv2.weight"] == [32, 128, 3, 3]
        planes += 32 * blocks
        if stage < 4:
            out = math.floor(planes * 0.5)
            assert s[f"trans{stage}.conv.weight"] == [out, planes, 1, 1] and s[f"trans{stage}.bn.weight"] == [planes]
            planes = out
    assert "trans4.conv.weight" not in s
    assert planes == 1024 and s["bn.weight"] == [1024]
    assert net.linear.in_features == 1024 and s["linear.weight"] == [10, 1024]
    with torch.no_grad():
        x = torch.randn(2, 64, 8, 8)
        block_out = net.dense1[0](x)
        assert net(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    torch.testing.assert_close(block_out[:, 32:], x)  # new features first, then the input


def test_resnet18_mnist_is_torchvision_with_gray_stem():
    net = build_model("resnet18_mnist")
    tv = shapes(torchvision.models.resnet18(weights=None, num_classes=10))
    s = shapes(net)
    assert s["conv1.weight"] == [64, 1, 7, 7]
    assert net.conv1.stride == (2, 2) and net.conv1.padding == (3, 3) and net.conv1.bias is None
    assert s.keys() == tv.keys()
    assert {k: v for k, v in s.items() if k != "conv1.weight"} == {k: v for k, v in tv.items() if k != "conv1.weight"}


def test_resnet50_is_torchvision():
    net = fresh("resnet50", 0)
    assert shapes(net) == shapes(torchvision.models.resnet50(weights=None))
    with torch.no_grad():
        assert net(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


@pytest.mark.parametrize(
    "name, shape",
    [("lenet", (1, 28, 28)), ("resnet18_mnist", (1, 28, 28)), ("resnet18", (3, 32, 32)), ("vgg19", (3, 32, 32))],
)
def test_forward_shapes(name, shape):
    net = fresh(name, 0)
    with torch.no_grad():
        assert net(torch.randn(2, *shape)).shape == (2, 10)
        assert build_model(name, num_classes=7).eval()(torch.randn(2, *shape)).shape == (2, 7)


def test_in_channels_override():
    assert build_model("resnet18", in_channels=1).conv1.weight.shape[1] == 1
    assert build_model("vgg19", in_channels=1).features[0].weight.shape[1] == 1
    assert build_model("resnet18_mnist", in_channels=3).conv1.weight.shape[1] == 3
    net = build_model("resnet18", in_channels=1).eval()
    with torch.no_grad():
        assert net(torch.randn(2, 1, 32, 32)).shape == (2, 10)


def test_cifar_net_rejects_wrong_image_size_clearly():
    with pytest.raises(ValueError, match="32x32"):
        build_model("resnet18").eval()(torch.randn(1, 3, 64, 64))


def test_unknown_name_and_bad_arguments():
    with pytest.raises(ValueError) as info:
        build_model("resnet19")
    assert all(name in str(info.value) for name in MODEL_NAMES)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("lenet", num_classes=0)


def test_guess_architecture():
    assert guess_architecture(build_model("vgg19").state_dict())["name"] == "vgg19"
    guess = guess_architecture(build_model("resnet18_mnist", num_classes=5).state_dict())
    assert guess == {"name": "resnet18_mnist", "num_classes": 5, "in_channels": 1}
    assert guess_architecture({"foo.weight": torch.zeros(1)}) is None


# ---------------------------------------------------------------- loading


def assert_same_outputs(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_raw_state_dict_round_trip(tmp_path):
    src, dst = fresh("resnet18", 0), fresh("resnet18", 1)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(src(x), dst(x))
    torch.save(src.state_dict(), tmp_path / "model.t7")
    assert load_weights(dst, tmp_path / "model.t7") is dst
    assert_same_outputs(src, dst, x)
    for k, v in src.state_dict().items():  # buffers too (running stats, num_batches_tracked)
        assert torch.equal(v, dst.state_dict()[k]), k


def test_dataparallel_prefix_and_missing_bn_counters(tmp_path):
    src, dst = fresh("resnet18_mnist", 0), fresh("resnet18_mnist", 1)
    sd = {f"module.{k}": v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(sd, tmp_path / "dp.t7")
    load_weights(dst, str(tmp_path / "dp.t7"))
    assert_same_outputs(src, dst, torch.randn(2, 1, 28, 28))


def test_raw_state_dict_into_normalized_model_keeps_normalisation(tmp_path):
    src = fresh("lenet", 0)
    torch.save(src.state_dict(), tmp_path / "model.t7")
    model = NormalizedModel(Normalize(0.1307, 0.3081, (1, 28, 28)), fresh("lenet", 1))
    load_weights(model, tmp_path / "model.t7")
    assert torch.equal(model.normalize.mean, torch.full((1, 28, 28), 0.1307))
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src((x - 0.1307) / 0.3081), rtol=0, atol=0)


def lightning_checkpoint(model: NormalizedModel) -> dict:
    """The layout Lightning writes for a LightningModule holding the NormalizedModel as `model`."""
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["train_acc.total"] = torch.tensor(5)  # other LightningModule state is ignored
    return {"epoch": 3, "global_step": 30, "state_dict": state, "hyper_parameters": {"model": "lenet", "lr": 0.21}}


def test_lightning_checkpoint_into_normalized_model_and_bare_net(tmp_path):
    mean = torch.rand(1, 28, 28)  # e.g. the flipped mean image
    src = NormalizedModel(Normalize(mean, 0.5, (1, 28, 28)), fresh("lenet", 0))
    torch.save(lightning_checkpoint(src), tmp_path / "last.ckpt")
    dst = NormalizedModel(Normalize.identity((1, 28, 28)), fresh("lenet", 1))
    load_weights(dst, tmp_path / "last.ckpt")
    assert torch.equal(dst.normalize.mean, mean) and torch.equal(dst.normalize.std, torch.full((1, 1, 1), 0.5))
    assert_same_outputs(src, dst, torch.rand(2, 1, 28, 28))
    bare = load_weights(fresh("lenet", 2), tmp_path / "last.ckpt")
    assert_same_outputs(src.net, bare, torch.randn(2, 1, 28, 28))


def test_real_lightning_checkpoint_loads_without_pickle(tmp_path):
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self, lr: float = 0.1):
            super().__init__()
            self.save_hyperparameters()
            self.model = NormalizedModel(Normalize(0.1307, 0.3081, (1, 28, 28)), build_model("lenet"))

        def training_step(self, batch, _):
            return F.cross_entropy(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

    data = torch.utils.data.TensorDataset(torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]))
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
    )  # fmt: skip
    module = Module()
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    trainer.save_checkpoint(tmp_path / "real.ckpt")
    dst = NormalizedModel(Normalize.identity((1, 28, 28)), fresh("lenet", 1))
    load_weights(dst, tmp_path / "real.ckpt")  # weights_only=True
    assert_same_outputs(module.model.eval(), dst, torch.rand(2, 1, 28, 28))


def madry_checkpoint(net: nn.Module, mean: list[float], std: list[float]) -> dict:
    """MadryLab robustness layout: weights under module.model., a duplicate under module.attacker.model."""
    sd = net.state_dict()
    model = {f"module.model.{k}": v for k, v in sd.items()}
    model |= {f"module.attacker.model.{k}": v.clone() for k, v in sd.items()}
    model["module.normalizer.new_mean"] = torch.tensor(mean).reshape(3, 1, 1)
    model["module.normalizer.new_std"] = torch.tensor(std).reshape(3, 1, 1)
    return {"model": model, "optimizer": {}, "schedule": None, "epoch": 90, "args": argparse.Namespace(eps=3.0)}


def test_madry_checkpoint_needs_opt_in_and_maps_normaliser(tmp_path):
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    src = fresh("resnet18_mnist", 0, in_channels=3, num_classes=1000)  # torchvision names, like Madry's ResNet-50
    torch.save(madry_checkpoint(src, mean, std), tmp_path / "madry.pt")
    dst = NormalizedModel(Normalize.identity((3, 40, 40)), fresh("resnet18_mnist", 1, in_channels=3, num_classes=1000))
    with pytest.raises(UntrustedCheckpointError, match="trusted_pickle"):
        load_weights(dst, tmp_path / "madry.pt")
    load_weights(dst, tmp_path / "madry.pt", trusted_pickle=True)
    assert dst.normalize.mean.shape == (3, 40, 40)
    torch.testing.assert_close(dst.normalize.mean[:, 7, 13], torch.tensor(mean))
    x = torch.rand(2, 3, 40, 40)
    expected_in = (x - torch.tensor(mean).reshape(3, 1, 1)) / torch.tensor(std).reshape(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(expected_in))
    bare = load_weights(fresh("resnet18_mnist", 2, in_channels=3, num_classes=1000), tmp_path / "madry.pt", True)
    assert_same_outputs(src, bare, torch.randn(1, 3, 40, 40))


def test_wrong_architecture_lists_keys_and_suggests_model(tmp_path):
    torch.save(build_model("vgg19").state_dict(), tmp_path / "vgg.t7")
    dst = fresh("resnet18", 1)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(dst, tmp_path / "vgg.t7")
    err = info.value
    assert "linear.weight" in err.missing and "features.0.weight" in err.unexpected
    msg = str(err)
    assert "conv1.weight" in msg and "features.0.weight" in msg and "vgg19" in msg and "more)" in msg
    assert len(msg) < 3000  # long key lists are truncated
    assert all(torch.equal(v, dst.state_dict()[k]) for k, v in before.items())  # nothing was loaded


def test_shape_mismatch_reported(tmp_path):
    torch.save(build_model("lenet", num_classes=100).state_dict(), tmp_path / "lenet.t7")
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(build_model("lenet"), tmp_path / "lenet.t7")
    assert not info.value.missing and not info.value.unexpected
    assert any(s.startswith("fc3.weight") and "[100, 84]" in s for s in info.value.shape_mismatches)
    assert "num_classes: checkpoint 100 vs model 10" in str(info.value)
    torch.save(build_model("lenet", image_size=32).state_dict(), tmp_path / "lenet32.t7")
    with pytest.raises(CheckpointMismatchError, match="image_size: checkpoint 32 vs model 28"):
        load_weights(build_model("lenet"), tmp_path / "lenet32.t7")


def test_normalisation_shape_mismatch_reported(tmp_path):
    src = NormalizedModel(Normalize(0.5, 0.5, (1, 32, 32)), build_model("lenet"))
    torch.save(lightning_checkpoint(src), tmp_path / "x.ckpt")
    dst = NormalizedModel(Normalize(0.5, 0.5, (1, 28, 28)), build_model("lenet"))
    with pytest.raises(CheckpointMismatchError, match=r"normalize\.mean"):
        load_weights(dst, tmp_path / "x.ckpt")


def test_missing_file_and_garbage(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.t7"):
        load_weights(build_model("lenet"), tmp_path / "nope.t7")
    (tmp_path / "text.t7").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="text.t7"):
        load_weights(build_model("lenet"), tmp_path / "text.t7")
