"""Tests of evaluate_margin.py: end to end on real MNIST (release state_dict and Lightning checkpoint), synthetic
data and an ImageNet-style image folder; every kind of bad input fails early with one line and writes nothing."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from torchvision.datasets import MNIST

import evaluate_margin
from attacks.deepfool import SubspaceDeepFool
from common.memory import can_keep_freed_memory
from datamodules import ImageNetDataModule, MNISTDataModule, SyntheticDataModule
from frequency import DCTBlockSubspaces, FullSpace
from lightning_modules import ClassifierModule
from margins import read_report, select_indices
from margins.inputs import gather_samples
from models import Normalize, NormalizedModel, build_model
from tests.conftest import MNIST_RAW, SHARED_DATA

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081  # the release's constants
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The CPUs are shared: one intra-op thread avoids oversubscription (40x slower training otherwise)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _trainer(max_steps: int) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip


def _lightning_checkpoint(path: Path, module: ClassifierModule, datamodule: L.LightningDataModule) -> Path:
    """Save `module` as this project's Lightning checkpoint (with the datamodule's hyperparameters).

    One `fit` step with learning rate 0 attaches the datamodule without changing the weights (checked)."""
    before = {k: v.clone() for k, v in module.model.net.state_dict().items()}
    trainer = _trainer(max_steps=1)
    trainer.fit(module, datamodule=datamodule)
    assert all(torch.equal(before[k], v) for k, v in module.model.net.state_dict().items())
    trainer.save_checkpoint(path)
    return path


def _mnist_test_images(indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Test images [N, 1, 28, 28] in [0, 1] and labels, straight from torchvision (independent of datamodules)."""
    raw = MNIST(str(SHARED_DATA), train=False, download=False)
    idx = torch.as_tensor(indices)
    return raw.data[idx].unsqueeze(1).float() / 255.0, raw.targets[idx].long()


def _release_model(state_dict: dict) -> NormalizedModel:
    net = build_model("lenet")
    net.load_state_dict(state_dict)
    return NormalizedModel(Normalize([MNIST_MEAN], [MNIST_STD], (1, 28, 28)), net).eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """LeNet trained briefly on real MNIST (> 80 % test accuracy), saved as the release's raw `model.t7` and as
    this project's Lightning checkpoint `run.ckpt`."""
    if not (MNIST_RAW / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"real MNIST not found in {MNIST_RAW}")
    root = tmp_path_factory.mktemp("trained")
    dm = MNISTDataModule(data_dir=str(SHARED_DATA), batch_size=64)
    x, y = dm.train_tensors
    torch.manual_seed(0)
    net = build_model("lenet")
    model = NormalizedModel(Normalize([MNIST_MEAN], [MNIST_STD], (1, 28, 28)), net)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        batch = torch.randint(0, x.shape[0], (64,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    xt, yt = _mnist_test_images(np.arange(2000))
    with torch.no_grad():
        accuracy = float((model(xt).argmax(1) == yt).float().mean())
    assert accuracy > 0.8, f"the test model must classify MNIST (got {accuracy:.2f}) for the margins to mean something"
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    torch.save(state, root / "model.t7")
    module = ClassifierModule(net="lenet", lr=0.0, schedule="constant")
    module.model.net.load_state_dict(state)
    _lightning_checkpoint(root / "run.ckpt", module, MNISTDataModule(data_dir=str(SHARED_DATA), batch_size=64))
    return SimpleNamespace(root=root, t7=root / "model.t7", ckpt=root / "run.ckpt", state=state)


def _run(argv: list[str], capsys) -> tuple[int, str, str]:
    code = evaluate_margin.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- end to end on MNIST -----------------------------------------------------------------------------------
def test_release_state_dict_defaults_and_lightning_checkpoint_alone(trained, tmp_path, capsys):
    out_t7, out_ckpt, out_coarse = tmp_path / "t7", tmp_path / "ckpt", tmp_path / "coarse"
    explicit = ["--model", "lenet", "--dataset", "mnist", "--checkpoint", trained.t7, "--data-dir", SHARED_DATA]
    code, stdout, _ = _run([*explicit, "--num-samples", 5, "--output-dir", out_t7], capsys)
    assert code == 0
    assert str(out_t7.resolve()) in stdout and "clean accuracy" in stdout and "not converged" in stdout

    result = read_report(out_t7)
    margins, converged, indices = result.margins, result.converged, result.indices
    assert margins.dtype == np.float32 and margins.shape == (21, 5)  # release MNIST default: 8x8 blocks, step 1
    assert converged.dtype == np.bool_ and converged.shape == (21, 5)
    assert indices.dtype == np.int64
    np.testing.assert_array_equal(indices, select_indices(10000, 5, seed=0))
    assert (out_t7 / "margins.png").stat().st_size > 0

    # independent reference: torchvision images, the release's normalisation, the attack called directly
    x, y = _mnist_test_images(indices)
    model = _release_model(trained.state)
    direct = SubspaceDeepFool()(model, x, DCTBlockSubspaces((1, 28, 28), 8, 1))
    np.testing.assert_allclose(margins, direct.margins.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(converged, direct.converged.numpy())
    assert np.all(margins[:, :] > 0)

    settings = result.settings
    assert settings["model"]["net"] == "lenet" and settings["dataset"] == "mnist" and settings["transform"] == "none"
    assert settings["checkpoint"] == str(trained.t7.resolve()) and settings["checkpoint_format"] == "state_dict"
    assert settings["normalization"] == "dataset" and settings["data_dir"] == str(SHARED_DATA.resolve())
    assert (settings["subspace"], settings["subspace_dim"], settings["subspace_step"]) == ("dct", 8, 1)
    assert settings["num_subspaces"] == 21 and settings["num_samples"] == 5 and settings["seed"] == 0
    assert (settings["overshoot"], settings["max_iter"], settings["indices_file"]) == (0.02, 100, None)
    assert settings["device_type"] == "cpu" and settings["torch_version"] == torch.__version__
    assert settings["checkpoint_sha256"] and settings["dtype"] == "float32"
    assert settings["keep_freed_memory"] is can_keep_freed_memory()  # the command's default, where glibc allows it
    expected_accuracy = float((direct.labels == y).float().mean())
    assert result.extra["clean_accuracy"] == pytest.approx(expected_accuracy)
    assert result.extra["seconds"] > 0
    assert result.stats["num_not_converged_total"] == int((~direct.converged).sum())
    np.testing.assert_allclose(result.stats["median_margin_all"], np.median(margins, axis=1), rtol=1e-6)

    # this project's checkpoint alone: model, dataset, transform and data_dir come from its hyperparameters
    code, _, _ = _run(["--checkpoint", trained.ckpt, "--num-samples", 5, "--output-dir", out_ckpt], capsys)
    assert code == 0
    alone = read_report(out_ckpt)
    np.testing.assert_array_equal(alone.indices, indices)
    np.testing.assert_allclose(alone.margins, margins, rtol=1e-5, atol=1e-7)
    alone_settings = alone.settings
    assert alone_settings["checkpoint_format"] == "lightning" and alone_settings["normalization"] == "checkpoint"
    assert alone_settings["data"]["dataset"] == "mnist" and alone_settings["model"]["net"] == "lenet"

    # explicit flags with the checkpoint, coarser subspaces: rows = blocks starting at 0 and 20 of the step-1 run
    argv = [*explicit[:4], "--checkpoint", trained.ckpt, "--num-samples", 5, "--subspace-step", 20]
    code, _, _ = _run([*argv, "--output-dir", out_coarse, "--no-progress", "--return-freed-memory"], capsys)
    assert code == 0
    coarse = read_report(out_coarse)
    assert coarse.settings["subspace_step"] == 20
    assert coarse.settings["keep_freed_memory"] is False
    np.testing.assert_allclose(coarse.margins, margins[[0, 20]], rtol=1e-5, atol=1e-7)


def test_indices_file_order_and_full_space(trained, tmp_path, capsys):
    order = np.array([4321, 7, 999], dtype=np.int64)  # deliberately unsorted
    np.save(tmp_path / "idx.npy", order)
    out = tmp_path / "out"
    argv = [
        "--checkpoint",
        trained.ckpt,
        "--indices-file",
        tmp_path / "idx.npy",
        "--subspace",
        "full",
        "--output-dir",
        out,
    ]
    code, stdout, _ = _run([*argv, "--num-samples", 50], capsys)  # --indices overrides --num-samples
    assert code == 0 and "full input space" in stdout
    result = read_report(out)
    np.testing.assert_array_equal(result.indices, order)
    assert result.margins.shape == (1, 3)
    x, _ = _mnist_test_images(order)
    direct = SubspaceDeepFool()(_release_model(trained.state), x, FullSpace((1, 28, 28)))
    np.testing.assert_allclose(result.margins, direct.margins.numpy(), rtol=1e-5, atol=1e-7)
    settings = result.settings
    assert settings["indices_file"] == str((tmp_path / "idx.npy").resolve()) and settings["num_samples"] == 3
    assert settings["subspace"] == "full" and settings["num_subspaces"] == 1 and settings["subspace_dim"] is None


def test_madrylab_checkpoint_needs_trust_and_carries_its_normalization(trained, tmp_path, capsys):
    """MadryLab layout: weights under `module.model.`, a duplicate under `module.attacker.model.`, per-channel
    `module.normalizer.new_mean/new_std` [C, 1, 1], and pickled Python objects beside them."""
    weights = {f"module.model.{k}": v for k, v in trained.state.items()}
    weights |= {f"module.attacker.model.{k}": v for k, v in trained.state.items()}
    weights["module.normalizer.new_mean"] = torch.full((1, 1, 1), MNIST_MEAN)
    weights["module.normalizer.new_std"] = torch.full((1, 1, 1), MNIST_STD)
    torch.save({"model": weights, "epoch": 3, "schedule": argparse.Namespace(lr=0.1)}, tmp_path / "madry.pt")
    argv = ["--model", "lenet", "--dataset", "mnist", "--checkpoint", tmp_path / "madry.pt", "--data-dir", SHARED_DATA]
    argv += ["--num-samples", 4, "--subspace-step", 20, "--output-dir", tmp_path / "out"]
    code, _, stderr = _run(argv, capsys)
    assert code == 2 and "--trusted-pickle" in stderr and not (tmp_path / "out").exists()
    code, _, _ = _run([*argv, "--trusted-pickle"], capsys)
    assert code == 0
    result = read_report(tmp_path / "out")
    settings = result.settings
    assert settings["checkpoint_format"] == "madrylab" and settings["normalization"] == "checkpoint"
    x, _ = _mnist_test_images(result.indices)
    direct = SubspaceDeepFool()(_release_model(trained.state), x, DCTBlockSubspaces((1, 28, 28), 8, 20))
    np.testing.assert_allclose(result.margins, direct.margins.numpy(), rtol=1e-5, atol=1e-7)


# ---- synthetic data: generation arguments come from the checkpoint ----------------------------------------
def test_synthetic_checkpoint(tmp_path, capsys):
    data_args = dict(image_shape=(1, 16, 16), num_train=1024, num_test=64, eps=4.0, sigma=1.0, batch_size=64, seed=3)
    torch.manual_seed(0)
    module = ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16), lr=0.05, schedule="constant")
    trainer = _trainer(max_steps=60)
    trainer.fit(module, datamodule=SyntheticDataModule(**data_args))
    trainer.save_checkpoint(tmp_path / "synthetic.ckpt")

    out = tmp_path / "out"
    code, _, _ = _run(["--checkpoint", tmp_path / "synthetic.ckpt", "--num-samples", 6, "--output-dir", out], capsys)
    assert code == 0
    result = read_report(out)
    settings = result.settings
    assert settings["dataset"] == "synthetic" and settings["data"]["eps"] == 4.0 and settings["data"]["sigma"] == 1.0
    assert settings["data"]["image_shape"] == [1, 16, 16] and settings["data"]["num_test"] == 64
    assert (settings["subspace_dim"], settings["subspace_step"], settings["num_subspaces"]) == (8, 1, 9)
    np.testing.assert_array_equal(result.indices, select_indices(64, 6, seed=0))

    fresh = SyntheticDataModule(**data_args)  # regenerated from the same arguments
    x, y = gather_samples(fresh.margin_dataset(), result.indices)
    direct = SubspaceDeepFool()(module.model, x, DCTBlockSubspaces((1, 16, 16), 8, 1))
    np.testing.assert_allclose(result.margins, direct.margins.numpy(), rtol=1e-5, atol=1e-7)
    xt, yt = fresh.test_tensors
    with torch.no_grad():
        assert float((module.model(xt).argmax(1) == yt).float().mean()) > 0.75
    # the discriminative DCT atom (1, 1) lies in blocks 0 and 1 only: margins there are the small ones
    medians = np.median(result.margins, axis=1)
    assert medians[:2].max() < medians[2:].min()


# ---- ImageNet-style image folder ---------------------------------------------------------------------------
@pytest.fixture
def imagenet_tree(tmp_path, samples_dir) -> Path:
    pngs = sorted((samples_dir / "ImageNet").glob("*.png"))
    assert len(pngs) >= 4
    root = tmp_path / "imagenet"
    for split in ("train", "val"):
        for c, cls in enumerate(("n001", "n002")):
            (root / split / cls).mkdir(parents=True)
            for k in range(2):
                shutil.copy(pngs[2 * c + k], root / split / cls / f"img{k}.png")
    return root


def test_image_folder_lightning_checkpoint(imagenet_tree, tmp_path, capsys):
    """A small LeNet on 32x32 crops (image_size/resize recorded in the checkpoint's datamodule hyperparameters)."""
    dm = ImageNetDataModule(data_dir=str(imagenet_tree), image_size=32, resize=36, batch_size=2)
    torch.manual_seed(0)
    module = ClassifierModule(net="lenet", num_classes=2, image_shape=(3, 32, 32), lr=0.0, schedule="constant")
    _lightning_checkpoint(tmp_path / "folder.ckpt", module, dm)

    out = tmp_path / "out"
    code, _, _ = _run(["--checkpoint", tmp_path / "folder.ckpt", "--num-samples", 3, "--output-dir", out], capsys)
    assert code == 0
    result = read_report(out)
    assert result.margins.shape == (2, 3)  # 16x16 blocks with step 16 on 32x32 images
    np.testing.assert_array_equal(result.indices, select_indices(4, 3, seed=0))
    settings = result.settings
    assert settings["dataset"] == "imagenet" and settings["data"]["image_size"] == 32
    assert settings["normalization"] == "checkpoint"
    fresh = ImageNetDataModule(str(imagenet_tree), image_size=32, resize=36)
    x, y = gather_samples(fresh.margin_dataset(), result.indices)
    assert x.shape == (3, 3, 32, 32)
    direct = SubspaceDeepFool()(module.model, x, DCTBlockSubspaces((3, 32, 32), 16, 16))
    np.testing.assert_allclose(result.margins, direct.margins.numpy(), rtol=1e-5, atol=1e-7)
    accuracy = float((direct.labels == y).float().mean())
    assert result.extra["clean_accuracy"] == pytest.approx(accuracy)


def test_image_folder_raw_state_dict_uses_imagenet_normalization(imagenet_tree, tmp_path, capsys):
    """A raw state_dict (like torchvision's weights files) on 224x224 crops: the ImageNet constants go in front."""
    torch.manual_seed(0)
    net = build_model("lenet", num_classes=2, in_channels=3, image_size=224)
    torch.save(net.state_dict(), tmp_path / "weights.pth")
    out = tmp_path / "out"
    argv = ["--model", "lenet", "--dataset", "imagenet", "--checkpoint", tmp_path / "weights.pth"]
    argv += ["--data-dir", imagenet_tree, "--num-samples", 2, "--subspace-dim", 112, "--subspace-step", 112]
    code, _, _ = _run([*argv, "--max-iter", 3, "--output-dir", out], capsys)
    assert code == 0
    result = read_report(out)
    assert result.margins.shape == (2, 2) and result.settings["normalization"] == "dataset"
    assert result.extra["max_iterations"] <= 3
    x, _ = gather_samples(ImageNetDataModule(str(imagenet_tree)).margin_dataset(), result.indices)
    model = NormalizedModel(Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD), (3, 224, 224)), net)
    direct = SubspaceDeepFool(max_iter=3)(model, x, DCTBlockSubspaces((3, 224, 224), 112, 112))
    np.testing.assert_allclose(result.margins, direct.margins.numpy(), rtol=1e-5, atol=1e-7)


def test_image_folder_resnet50(imagenet_tree, tmp_path, capsys):
    """The paper's ImageNet architecture on the image-folder path (about 5 s with one CPU thread)."""
    torch.manual_seed(0)
    torch.save(build_model("resnet50", num_classes=2).state_dict(), tmp_path / "resnet50.pth")
    out = tmp_path / "out"
    argv = ["--model", "resnet50", "--dataset", "imagenet", "--checkpoint", tmp_path / "resnet50.pth"]
    argv += ["--data-dir", imagenet_tree, "--num-samples", 2, "--subspace-dim", 112, "--subspace-step", 112]
    code, _, _ = _run([*argv, "--max-iter", 2, "--output-dir", out], capsys)
    assert code == 0
    result = read_report(out)
    assert result.margins.shape == (2, 2) and result.extra["max_iterations"] <= 2
    assert result.settings["model"] == {"net": "resnet50", "num_classes": 2, "image_shape": [3, 224, 224]}


# ---- bad input -----------------------------------------------------------------------------------------------
@pytest.fixture
def bad_input(tmp_path, tiny_mnist_root) -> SimpleNamespace:
    """An untrained LeNet as a raw state_dict, a checkpoint dict with hyperparameters, a pickled file, index files;
    data: a generated 64-image MNIST in the raw idx layout (no real data needed)."""
    torch.save(build_model("lenet").state_dict(), tmp_path / "lenet.t7")
    fake_ckpt = {
        "state_dict": {f"model.net.{k}": v for k, v in build_model("lenet").state_dict().items()},
        "hyper_parameters": {"net": "lenet", "num_classes": 10, "image_shape": (1, 28, 28)},
        "datamodule_hyper_parameters": {"dataset": "mnist", "data_dir": str(tiny_mnist_root), "transform": "none"},
    }
    torch.save(fake_ckpt, tmp_path / "run.ckpt")
    torch.save({"args": argparse.Namespace(arch="resnet50")}, tmp_path / "pickled.pt")
    np.save(tmp_path / "outside.npy", np.array([0, 64]))
    np.save(tmp_path / "dupes.npy", np.array([3, 8, 3]))
    return SimpleNamespace(root=tmp_path, data=tiny_mnist_root)


def _bad_cases(b: SimpleNamespace) -> dict[str, tuple[list, str]]:
    lenet = ["--model", "lenet", "--dataset", "mnist", "--checkpoint", b.root / "lenet.t7", "--data-dir", b.data]
    return {
        "missing checkpoint": ([*lenet[:4], "--checkpoint", b.root / "nope.t7"], "checkpoint file not found"),
        "wrong architecture": (
            ["--model", "resnet18_mnist", *lenet[2:]],
            "does not fit --model resnet18_mnist.*missing.*Likely fix: --model lenet",
        ),
        "subspace larger than image": (
            [*lenet, "--subspace-dim", 29],
            r"subspace_dim=29 \(--subspace-dim\) does not fit the 28x28",
        ),
        "too many samples": ([*lenet, "--num-samples", 65], "mnist test split has 64 samples"),
        "indices out of range": ([*lenet, "--indices-file", b.root / "outside.npy"], r"outside \[0, 64\)"),
        "duplicate indices": ([*lenet, "--indices-file", b.root / "dupes.npy"], r"duplicates: \[3\]"),
        "missing data dir": ([*lenet[:-1], b.root / "no_data"], "MNIST not found.*no_data.*--data-dir"),
        "unknown model": ([*lenet[:1], "vgg11", *lenet[2:]], "invalid choice: 'vgg11'"),
        "no model info": (["--checkpoint", b.root / "lenet.t7"], "pass --model and --dataset"),
        "model contradicts checkpoint": (
            ["--checkpoint", b.root / "run.ckpt", "--model", "resnet18_mnist"],
            "contradicts the checkpoint.*'lenet'",
        ),
        "pickled checkpoint": ([*lenet[:4], "--checkpoint", b.root / "pickled.pt"], "pass --trusted-pickle"),
        "full space with block": (
            [*lenet, "--subspace", "full", "--subspace-dim", 4],
            r"subspace_dim/subspace_step \(--subspace-dim/--subspace-step\) do not apply to full subspaces",
        ),
        "channels-last is gone": ([*lenet, "--channels-last"], "unrecognized arguments: --channels-last"),
        "bad kernels": ([*lenet, "--kernels", "fast"], "invalid choice: 'fast'"),
    }


CASES = (
    "missing checkpoint",
    "wrong architecture",
    "subspace larger than image",
    "too many samples",
    "indices out of range",
    "duplicate indices",
    "missing data dir",
    "unknown model",
    "no model info",
    "model contradicts checkpoint",
    "pickled checkpoint",
    "full space with block",
    "channels-last is gone",
    "bad kernels",
)


@pytest.mark.parametrize("case", CASES)
def test_bad_input_fails_early_with_one_line(case, bad_input, capsys):
    argv, pattern = _bad_cases(bad_input)[case]
    out = bad_input.root / "out"
    code, stdout, stderr = _run([*argv, "--output-dir", out], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert stdout == "" and not out.exists()
    assert not any(p.name.startswith(".out.tmp") for p in bad_input.root.iterdir())


def test_bad_input_leaves_previous_results_untouched(trained, tmp_path, capsys):
    out = tmp_path / "previous"
    code, _, _ = _run(
        ["--checkpoint", trained.ckpt, "--num-samples", 2, "--subspace", "full", "--output-dir", out], capsys
    )
    assert code == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    code, _, stderr = _run(["--checkpoint", trained.ckpt, "--num-samples", 10001, "--output-dir", out], capsys)
    assert code == 2 and stderr.count("\n") == 1
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert json.loads((out / "summary.json").read_text())["settings"]["num_samples"] == 2


def test_batch_size_is_a_deprecated_alias_of_chunk_rows_and_kernels_are_recorded(bad_input, capsys):
    """--batch-size still sets the chunk size, with one deprecation line; --kernels off reaches the engine and the
    settings (reference: the engine on the one chunk of rows with kernels off, and with kernels auto)."""
    lenet = ["--model", "lenet", "--dataset", "mnist", "--checkpoint", bad_input.root / "lenet.t7"]
    argv = [*lenet, "--data-dir", bad_input.data, "--num-samples", 3, "--subspace-step", 20, "--max-iter", 5,
            "--threads", 1]  # fmt: skip
    out = bad_input.root / "alias"
    code, _, stderr = _run([*argv, "--batch-size", 7, "--kernels", "off", "--output-dir", out], capsys)
    assert code == 0
    assert "warning: --batch-size is deprecated, use --chunk-rows" in stderr.splitlines()
    result = read_report(out)
    assert result.settings["chunk_rows"] == 7 and result.settings["kernels"] == "off"
    assert result.extra["num_chunks"] == 1  # 3 samples x 2 subspaces = 6 rows <= 7
    net = build_model("lenet")
    net.load_state_dict(torch.load(bad_input.root / "lenet.t7", weights_only=True))
    model = NormalizedModel(Normalize([MNIST_MEAN], [MNIST_STD], (1, 28, 28)), net).eval()
    x, _ = gather_samples(MNISTDataModule(data_dir=str(bad_input.data)).margin_dataset(), result.indices)
    family = DCTBlockSubspaces((1, 28, 28), 8, 20)
    rows = torch.arange(6)  # the one chunk: sample-major rows (sample, subspace)
    engine = {k: SubspaceDeepFool(max_iter=5, batch_size=7, kernels=k) for k in ("off", "auto")}
    direct = {k: e.attack_rows(model, x, family, rows // 2, rows % 2) for k, e in engine.items()}
    np.testing.assert_array_equal(result.margins, direct["off"].margins.numpy().reshape(3, 2).T)  # same bits
    np.testing.assert_array_equal(result.iterations, direct["off"].iterations.numpy().reshape(3, 2).T)
    code, _, stderr = _run([*argv, "--chunk-rows", 7, "--output-dir", bad_input.root / "auto"], capsys)
    assert code == 0 and "deprecated" not in stderr
    auto = read_report(bad_input.root / "auto")
    assert auto.settings["kernels"] == "auto"  # the default
    np.testing.assert_array_equal(auto.margins, direct["auto"].margins.numpy().reshape(3, 2).T)
    assert not np.array_equal(auto.margins, result.margins)  # the kernels move float rounding: the flag took effect
