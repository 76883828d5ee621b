"""Datamodules: real MNIST, a fake CIFAR-10 in torchvision's pickle layout, ImageNet folders, synthetic data.

References are independent of the code under test: raw idx files parsed with numpy, scipy.fft for DCTs.
"""

from __future__ import annotations

import inspect
import os
import pickle
import shutil
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torchvision.datasets.cifar as tv_cifar
from PIL import Image
from scipy.fft import dctn, idctn
from torch.utils.data import RandomSampler, SequentialSampler
from torchvision.datasets import MNIST

import frequency
from datamodules import (
    DATASETS,
    CIFAR10DataModule,
    DatasetNotFoundError,
    FrequencyDataModule,
    ImageNetDataModule,
    MNISTDataModule,
    SyntheticDataModule,
    TensorDataModule,
    build_datamodule,
    split_indices,
)
from datamodules.mnist import read_mnist, resolve_mnist_root


# ---- independent references -----------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (MNIST raw format) with numpy."""
    raw = np.fromfile(path, dtype=np.uint8)
    ndim = int(raw[3])
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i].tobytes(), "big") for i in range(ndim)]
    return raw[4 + 4 * ndim :].reshape(dims)


def sp_dct(x: np.ndarray) -> np.ndarray:
    return dctn(np.asarray(x, dtype=np.float64), axes=(-2, -1), norm="ortho")


def sp_idct(c: np.ndarray) -> np.ndarray:
    return idctn(c, axes=(-2, -1), norm="ortho")


def sp_flip(x: np.ndarray) -> np.ndarray:
    return sp_idct(sp_dct(x)[..., ::-1, ::-1])


def sp_low_pass(x: np.ndarray, bw: int) -> np.ndarray:
    c = sp_dct(x)
    c[..., bw:, :] = 0
    c[..., :, bw:] = 0
    return sp_idct(c)


def sp_channel_stats(x: np.ndarray, fn, chunk: int = 10000) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean/std of fn(x) over [N, H, W], x: [N, C, H, W], float64 in chunks."""
    s = np.zeros(x.shape[1])
    s2 = np.zeros(x.shape[1])
    for i in range(0, len(x), chunk):
        f = fn(x[i : i + chunk].astype(np.float64))
        s += f.sum(axis=(0, 2, 3))
        s2 += (f**2).sum(axis=(0, 2, 3))
    n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    return mean, np.sqrt(s2 / n - mean**2)


def write_mnist_raw(root: Path, n_train: int = 64, n_test: int = 32, seed: int = 0) -> dict[str, np.ndarray]:
    """Random digits in torchvision's uncompressed idx layout `<root>/MNIST/raw/*-ubyte`; returns the arrays."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, name, n in (("train", "train", n_train), ("t10k", "test", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{split}-images-idx3-ubyte").write_bytes(
            np.array([0, 0, 8, 3], ">u1").tobytes() + np.array([n, 28, 28], ">u4").tobytes() + images.tobytes()
        )
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(
            np.array([0, 0, 8, 1], ">u1").tobytes() + np.array([n], ">u4").tobytes() + labels.tobytes()
        )
        arrays[f"{name}_x"], arrays[f"{name}_y"] = images, labels
    return arrays


@pytest.fixture
def tiny_mnist(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    """A generated 64 + 32 image MNIST in the raw idx layout (runs without ../shared/data)."""
    return tmp_path, write_mnist_raw(tmp_path)


def test_tiny_mnist_layout_is_read_like_the_real_one(tiny_mnist):
    """Reference: the generated arrays, re-read by the numpy idx parser above."""
    root, arrays = tiny_mnist
    assert np.array_equal(read_idx(root / "MNIST" / "raw" / "t10k-images-idx3-ubyte"), arrays["test_x"])
    dm = MNISTDataModule(data_dir=str(root))
    np.testing.assert_allclose(dm.train_tensors[0][:, 0].numpy(), arrays["train_x"] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(dm.test_tensors[1].numpy(), arrays["test_y"])


@pytest.mark.parametrize("kind", ["low_pass_rows_release", "high_pass_last_block"])
def test_new_filters_normalise_with_filtered_training_statistics(tiny_mnist, kind):
    """Reference: scipy dctn/idctn with the paper's masks as numpy slices, statistics in float64."""
    root, arrays = tiny_mnist
    dm = MNISTDataModule(data_dir=str(root), transform=kind, bandwidth=8)

    def sp_filter(t: np.ndarray) -> np.ndarray:
        c, kept = sp_dct(t), np.zeros(t.shape)
        if kind == "low_pass_rows_release":
            kept[..., :8, :] = c[..., :8, :]
        else:
            kept[..., -8:, -8:] = c[..., -8:, -8:]
        return sp_idct(kept)

    np.testing.assert_allclose(dm.test_tensors[0].numpy(), sp_filter(arrays["test_x"][:, None] / 255.0), atol=2e-7)
    mean, std = sp_channel_stats(arrays["train_x"][:, None] / 255.0, sp_filter)
    norm = dm.normalization()
    np.testing.assert_allclose(norm.mean[:, 3, 5].numpy(), mean, atol=1e-7)
    np.testing.assert_allclose(norm.std.flatten().numpy(), std, rtol=1e-6)


# ---- MNIST (real data, loaded once per configuration) -----------------------------------------------------
_MNIST: dict[tuple, MNISTDataModule] = {}


@pytest.fixture(scope="module", autouse=True)
def _free_mnist_cache():
    yield
    _MNIST.clear()


@pytest.fixture
def mnist(mnist_root):
    def get(transform: str = "none", **kwargs) -> MNISTDataModule:
        key = (transform, tuple(sorted(kwargs.items())))
        if key not in _MNIST:
            dm = MNISTDataModule(data_dir=str(mnist_root), transform=transform, **kwargs)
            dm.setup("fit")
            _MNIST[key] = dm
        return _MNIST[key]

    return get


@pytest.fixture
def mnist_raw(mnist_root) -> dict[str, np.ndarray]:
    raw = mnist_root / "MNIST" / "raw"
    return {
        "train_x": read_idx(raw / "train-images-idx3-ubyte"),
        "train_y": read_idx(raw / "train-labels-idx1-ubyte"),
        "test_x": read_idx(raw / "t10k-images-idx3-ubyte"),
        "test_y": read_idx(raw / "t10k-labels-idx1-ubyte"),
    }


def test_mnist_matches_raw_files(mnist, mnist_raw):
    dm = mnist("none")
    x, y = dm.train_tensors
    xt, yt = dm.test_tensors
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    np.testing.assert_allclose(x[:, 0].numpy(), mnist_raw["train_x"] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y.numpy(), mnist_raw["train_y"])
    np.testing.assert_array_equal(yt.numpy(), mnist_raw["test_y"])
    assert set(y.tolist()) == set(range(10)) and dm.num_classes == 10 and dm.image_shape == (1, 28, 28)
    # validation uses the test split by default (release); margins use the test split
    val_x, val_y = dm.val_set.tensors
    assert torch.equal(val_x, xt) and torch.equal(val_y, yt)
    assert torch.equal(dm.margin_dataset().tensors[0], xt)
    norm = dm.normalization()
    assert torch.allclose(norm.mean, torch.full((1, 28, 28), 0.1307)) and torch.allclose(norm.std, torch.tensor(0.3081))
    assert len(dm.subspaces()) == 21


def test_mnist_flip(mnist, mnist_raw):
    dm, plain = mnist("flip"), mnist("none")
    x = dm.train_tensors[0]
    np.testing.assert_allclose(x[:300, 0].numpy(), sp_flip(mnist_raw["train_x"][:300] / 255.0), atol=2e-5)
    np.testing.assert_allclose(
        dm.test_tensors[0][-300:, 0].numpy(), sp_flip(mnist_raw["test_x"][-300:] / 255.0), atol=2e-5
    )
    for i in (0, 1234, 59999):
        assert torch.allclose(x[i], frequency.flip(plain.train_tensors[0][i]), atol=1e-5)
    norm = dm.normalization()
    expected_mean = sp_flip(np.full((28, 28), 0.1307))
    assert np.ptp(expected_mean) > 0.4  # the flipped constant is a checkerboard-like atom, not a constant
    np.testing.assert_allclose(norm.mean[0].numpy(), expected_mean, atol=1e-5)
    assert torch.allclose(norm.std, torch.tensor(0.3081))


def test_mnist_low_pass(mnist, mnist_raw):
    dm = mnist("low_pass", bandwidth=16)
    coeff = sp_dct(dm.train_tensors[0][:500, 0].numpy())
    outside = coeff.copy()
    outside[:, :16, :16] = 0
    assert abs(outside).max() < 1e-4
    np.testing.assert_allclose(coeff[:, :16, :16], sp_dct(mnist_raw["train_x"][:500] / 255.0)[:, :16, :16], atol=1e-4)
    mean, std = sp_channel_stats(mnist_raw["train_x"][:, None] / 255.0, lambda t: sp_low_pass(t, 16))
    norm = dm.normalization()
    assert abs(std[0] - 0.3081) > 1e-3  # filtered statistics differ from the unfiltered constants
    np.testing.assert_allclose(norm.mean.flatten().numpy(), np.full(784, mean[0]), rtol=1e-5)
    np.testing.assert_allclose(norm.std.flatten().numpy(), std, rtol=1e-5)


def test_mnist_val_split_holds_out_deterministic_samples(mnist):
    full = mnist("none").train_tensors
    dm = mnist("none", val_split=1000, seed=3)
    train_idx, val_idx = split_indices(60000, 1000, 3)
    assert len(dm.train_set) == 59000 and len(dm.val_set) == 1000 and len(dm.test_set) == 10000
    assert torch.equal(dm.val_set.tensors[0], full[0][val_idx]) and torch.equal(dm.val_set.tensors[1], full[1][val_idx])
    assert torch.equal(dm.train_set.tensors[0], full[0][train_idx])


def test_split_indices_partition_and_determinism():
    train, val = split_indices(100, 10, seed=5)
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100)) and len(val) == 10
    assert torch.equal(val, split_indices(100, 10, seed=5)[1])
    assert not torch.equal(val, split_indices(100, 10, seed=6)[1])
    with pytest.raises(ValueError, match="val_split"):
        split_indices(10, 10, seed=0)


def test_mnist_root_resolution(mnist_root):
    assert resolve_mnist_root(mnist_root) == mnist_root
    assert resolve_mnist_root(mnist_root / "MNIST") == mnist_root
    assert resolve_mnist_root(mnist_root / "MNIST" / "raw") == mnist_root


def test_missing_mnist_gives_clear_error_and_setup_never_downloads(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(MNIST, "download", lambda self: calls.append(self.train))
    missing = tmp_path / "nothing_here"
    dm = MNISTDataModule(data_dir=str(missing), download=True)
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup("fit")
    message = str(info.value)
    assert str(missing) in message and "MNIST/raw/train-images-idx3-ubyte" in message
    assert "--data.download true" in message and calls == []
    assert isinstance(info.value, FileNotFoundError)
    MNISTDataModule(data_dir=str(missing), download=False).prepare_data()
    assert calls == []


# ---- CIFAR-10: a tiny fake in torchvision's python-pickle layout ------------------------------------------
def write_fake_cifar(root: Path, per_batch: int = 4, n_test: int = 6) -> dict[str, np.ndarray]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    out = {"train_x": [], "train_y": []}
    for b in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        with open(folder / f"data_batch_{b}", "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
        out["train_x"].append(data)
        out["train_y"] += labels
    test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, size=n_test).tolist()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({"data": test, "labels": test_labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return {
        "train_x": np.vstack(out["train_x"]).reshape(-1, 3, 32, 32),
        "train_y": np.array(out["train_y"]),
        "test_x": test.reshape(-1, 3, 32, 32),
        "test_y": np.array(test_labels),
    }


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """Fake CIFAR-10 files; torchvision's md5 check is relaxed to an existence check for this test only."""
    arrays = write_fake_cifar(tmp_path)
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    return tmp_path, arrays


def test_cifar10_loads_pickles(fake_cifar):
    root, arrays = fake_cifar
    dm = build_datamodule("cifar10", data_dir=str(root), batch_size=8)
    dm.setup("fit")
    x, y = dm.train_tensors
    assert x.shape == (20, 3, 32, 32) and dm.image_shape == (3, 32, 32) and dm.num_classes == 10
    np.testing.assert_allclose(x.numpy(), arrays["train_x"] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y.numpy(), arrays["train_y"])
    np.testing.assert_allclose(dm.test_tensors[0].numpy(), arrays["test_x"] / 255.0, atol=1e-7)
    norm = dm.normalization()
    assert torch.allclose(norm.mean[:, 5, 7], torch.tensor([0.4914, 0.4822, 0.4465]))
    assert torch.allclose(norm.std.flatten(), torch.tensor([0.247, 0.243, 0.261]))
    assert len(dm.subspaces()) == 13
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == torch.int64
    # pointing at the cifar-10-batches-py folder itself works too
    assert len(CIFAR10DataModule(data_dir=str(root / "cifar-10-batches-py")).test_set) == 6


def test_cifar10_high_pass_and_flip(fake_cifar):
    root, arrays = fake_cifar
    dm = CIFAR10DataModule(data_dir=str(root), transform="high_pass", bandwidth=16)
    coeff = sp_dct(dm.train_tensors[0].numpy())
    ref = sp_dct(arrays["train_x"] / 255.0)
    assert abs(coeff[..., :16, :16]).max() < 1e-4
    np.testing.assert_allclose(coeff[..., 16:, :], ref[..., 16:, :], atol=1e-4)
    mean, std = sp_channel_stats(arrays["train_x"] / 255.0, lambda t: t - sp_low_pass(t, 16))
    norm = dm.normalization()
    np.testing.assert_allclose(norm.mean[:, 0, 0].numpy(), mean, atol=1e-6)
    np.testing.assert_allclose(norm.std.flatten().numpy(), std, rtol=1e-5)

    flipped = CIFAR10DataModule(data_dir=str(root), transform="flip")
    np.testing.assert_allclose(flipped.test_tensors[0].numpy(), sp_flip(arrays["test_x"] / 255.0), atol=2e-5)
    const = np.broadcast_to(np.array([0.4914, 0.4822, 0.4465])[:, None, None], (3, 32, 32))
    np.testing.assert_allclose(flipped.normalization().mean.numpy(), sp_flip(const), atol=1e-5)


def test_cifar10_real_integrity_check_rejects_fake(tmp_path):
    write_fake_cifar(tmp_path)
    with pytest.raises(RuntimeError, match="md5"):
        CIFAR10DataModule(data_dir=str(tmp_path)).setup("test")


def test_missing_cifar10_error_names_directory(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        CIFAR10DataModule(data_dir=str(tmp_path / "c")).setup("fit")
    assert str(tmp_path / "c") in str(info.value) and "cifar-10-batches-py/" in str(info.value)


# ---- ImageNet folders -----------------------------------------------------------------------------------
@pytest.fixture
def imagenet_tree(tmp_path, samples_dir) -> Path:
    pngs = sorted((samples_dir / "ImageNet").glob("*.png"))
    assert len(pngs) >= 4
    for split in ("train", "val"):
        for c, cls in enumerate(("n001", "n002")):
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(2):
                shutil.copy(pngs[2 * c + k], tmp_path / split / cls / f"img{k}.png")
    return tmp_path


def test_imagenet_folders_and_on_the_fly_flip(imagenet_tree):
    dm = ImageNetDataModule(data_dir=str(imagenet_tree), batch_size=2)
    assert dm.num_classes == 2 and dm.image_shape == (3, 224, 224) and len(dm.subspaces()) == 14
    dm.setup("fit")
    xb, yb = next(iter(dm.train_dataloader()))
    assert xb.shape == (2, 3, 224, 224) and 0.0 <= float(xb.min()) and float(xb.max()) <= 1.0
    xv, yv = next(iter(dm.val_dataloader()))
    assert xv.shape == (2, 3, 224, 224) and yv.tolist() == [0, 0]
    flipped = ImageNetDataModule(data_dir=str(imagenet_tree), transform="flip")
    plain_x, label = dm.margin_dataset()[3]
    flip_x, flip_label = flipped.margin_dataset()[3]
    assert label == flip_label == 1
    # eval image: Resize(256) + CenterCrop(224) of the PNG (224 -> 256 -> crop 16 px each side), done by hand
    path = dm.margin_dataset().samples[3][0]
    ref = np.asarray(Image.open(path).convert("RGB").resize((256, 256), Image.BILINEAR), dtype=np.float64) / 255.0
    np.testing.assert_allclose(plain_x.numpy(), ref[16:240, 16:240].transpose(2, 0, 1), atol=0.02)
    assert torch.allclose(flip_x, frequency.flip(plain_x), atol=1e-5)
    const = np.broadcast_to(np.array([0.485, 0.456, 0.406])[:, None, None], (3, 224, 224))
    np.testing.assert_allclose(flipped.normalization().mean.numpy(), sp_flip(const), atol=1e-5)
    high = ImageNetDataModule(data_dir=str(imagenet_tree), transform="high_pass")
    assert float(high.normalization().mean.abs().max()) < 1e-6  # high-pass of a constant image is zero


def test_imagenet_val_only_and_missing(imagenet_tree, tmp_path):
    shutil.rmtree(imagenet_tree / "train")
    dm = ImageNetDataModule(data_dir=str(imagenet_tree))
    assert dm.num_classes == 2 and len(dm.test_set) == 4
    with pytest.raises(DatasetNotFoundError, match="no train/ directory"):
        dm.setup("fit")
    missing = tmp_path / "no_imagenet"
    with pytest.raises(DatasetNotFoundError) as info:
        ImageNetDataModule(data_dir=str(missing)).num_classes  # noqa: B018
    assert str(missing) in str(info.value) and "<data_dir>/train/<class>/" in str(info.value)


# ---- synthetic -------------------------------------------------------------------------------------------
def test_synthetic_generator_definition():
    dm = SyntheticDataModule(num_train=2000, num_test=500, eps=1.0, sigma=3.0, seed=1)
    dm.setup("fit")
    x, labels = dm.train_tensors
    v = dm.direction
    assert x.shape == (2000, 1, 32, 32) and dm.num_classes == 2 and v.shape == (1, 32, 32)
    assert abs(int(labels.sum()) - 1000) <= 100
    # v is the orthonormal DCT atom (1, 1): compare with scipy
    onehot = np.zeros((32, 32))
    onehot[1, 1] = 1.0
    np.testing.assert_allclose(v[0].numpy(), sp_idct(onehot), atol=1e-6)
    y = 2.0 * labels.double() - 1.0
    x64, v64 = x.double().flatten(1), v.double().flatten()
    along = x64 @ v64
    np.testing.assert_allclose(along.numpy(), (y * 0.5).numpy(), atol=1e-4)
    noise = x64 - (y[:, None] * 0.5) * v64[None, :]
    assert float((noise @ v64).abs().max()) < 1e-4
    assert abs(float(noise.std()) - 3.0) < 0.05
    assert not torch.equal(dm.test_tensors[0][:10], x[:10])  # train and test use different streams
    norm = dm.normalization()  # per-channel training-set statistics: about mean 0 and std sigma
    train = dm.train_tensors[0].double()
    assert norm.mean.flatten()[0].item() == pytest.approx(train.mean().item(), abs=1e-6)
    assert norm.std.flatten()[0].item() == pytest.approx(train.std(unbiased=False).item(), rel=1e-5)
    assert norm.std.flatten()[0].item() == pytest.approx(dm.hparams.sigma, rel=0.05)


def test_synthetic_seeds_and_random_direction():
    def make(seed: int, **kw) -> SyntheticDataModule:
        return SyntheticDataModule(num_train=64, num_test=16, seed=seed, **kw)

    a, b, c = make(0), make(0), make(1)
    assert torch.equal(a.train_tensors[0], b.train_tensors[0]) and torch.equal(a.test_tensors[1], b.test_tensors[1])
    assert not torch.equal(a.train_tensors[0], c.train_tensors[0])
    r0, r0b, r1 = make(0, direction="random"), make(0, direction="random"), make(1, direction="random")
    assert abs(float(r0.direction.double().norm()) - 1.0) < 1e-6
    assert torch.equal(r0.direction, r0b.direction) and not torch.allclose(r0.direction, r1.direction)
    along = r0.train_tensors[0].double().flatten(1) @ r0.direction.double().flatten()
    assert torch.allclose(along.abs(), torch.full_like(along, 0.5), atol=1e-4)
    multi = SyntheticDataModule(image_shape=(3, 16, 16), num_train=8, num_test=4, direction_index=(2, 3))
    d = multi.direction
    assert abs(float(d.double().norm()) - 1.0) < 1e-6 and torch.equal(d[0], d[2])
    # CLI-parsed lists are stored as tuples, equal to the image_shape linked into the model's hparams
    assert multi.hparams["image_shape"] == multi.image_shape == (3, 16, 16) and multi.hparams["direction_index"] == (
        2,
        3,
    )
    assert SyntheticDataModule(image_shape=[3, 16, 16], direction_index=[2, 3]).hparams["image_shape"] == (3, 16, 16)
    assert (multi.subspace_block, multi.subspace_step) == (8, 1) and (a.subspace_block, a.subspace_step) == (8, 2)
    with pytest.raises(ValueError, match="direction_index"):
        SyntheticDataModule(image_shape=(1, 8, 8), direction_index=(8, 0))


# ---- registry, hparams, dataloaders under Lightning --------------------------------------------------------
def test_registry_and_hparams_record_dataset():
    assert set(DATASETS) == {"mnist", "cifar10", "imagenet", "synthetic"}
    for name, cls in DATASETS.items():
        dm = build_datamodule(name, transform="flip", batch_size=7)
        assert isinstance(dm, cls) and dm.hparams["dataset"] == name
        assert dm.hparams["transform"] == "flip" and dm.hparams["batch_size"] == 7
        rebuilt = build_datamodule(**dict(dm.hparams), _class_path="ignored")
        assert dict(rebuilt.hparams) == dict(dm.hparams)
    assert build_datamodule("imagenet", image_size=64, resize=72).image_shape == (3, 64, 64)
    with pytest.raises(ValueError, match="mnist, cifar10, imagenet, synthetic"):
        build_datamodule("svhn")
    with pytest.raises(
        ValueError, match="none, flip, low_pass, low_pass_rows_release, high_pass, high_pass_last_block"
    ):
        MNISTDataModule(transform="lowpass")
    for kind in ("low_pass", "low_pass_rows_release", "high_pass", "high_pass_last_block"):
        with pytest.raises(ValueError, match="bandwidth"):
            MNISTDataModule(transform=kind, bandwidth=29)
        assert MNISTDataModule(transform=kind, bandwidth=28).hparams.transform == kind


def signature_arguments(cls: type) -> dict[str, object]:
    """Constructor arguments and defaults in signature order: the base's (FrequencyDataModule) first, then each
    subclass's own (those it forwards through **kwargs are the base's); *args/**kwargs left out."""
    out: dict[str, object] = {}
    for klass in reversed(cls.__mro__):
        if isinstance(klass, type) and issubclass(klass, FrequencyDataModule) and "__init__" in vars(klass):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.name != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in out:
                    out[p.name] = p.default
    return out


CASES = [
    ("mnist", {}),
    ("mnist", {"data_dir": "x", "transform": "low_pass", "bandwidth": 8, "val_split": 10}),
    ("cifar10", {"transform": "flip", "batch_size": 7, "pin_memory": False}),
    ("imagenet", {"data_dir": "d", "image_size": 32, "resize": 36, "transform": "high_pass"}),
    ("synthetic", {"image_shape": [3, 16, 16], "direction_index": [2, 3], "seed": 4, "num_train": 8}),
]


@pytest.mark.parametrize("name,kwargs", CASES)
def test_hparams_are_the_constructor_arguments_in_signature_order(name, kwargs):
    """Lightning's save_hyperparameters records every constructor argument (defaults included, CLI lists as
    tuples) in signature order, then the registry name `dataset`; `argument_names` lists the same arguments."""
    cls = DATASETS[name]
    dm = build_datamodule(name, **kwargs)
    assert type(dm) is cls and isinstance(dm, FrequencyDataModule) and isinstance(dm, L.LightningDataModule)
    assert isinstance(dm, TensorDataModule) == (name != "imagenet")  # ImageNet streams its images
    expected = signature_arguments(cls)
    expected.update({k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    assert list(dm.hparams.items()) == [*expected.items(), ("dataset", name)]
    assert cls.argument_names() == set(expected)
    assert dm.hparams.transform == kwargs.get("transform", "none")


@pytest.mark.parametrize("name,kwargs", CASES)
def test_recorded_hparams_rebuild_the_same_datamodule(name, kwargs):
    """A checkpoint's `datamodule_hyper_parameters` (dict(hparams), `dataset` included, LightningCLI's private keys
    beside them) rebuild a datamodule with the same hparams in the same order, image shape, classes, subspaces and
    normalisation."""
    dm = build_datamodule(name, **kwargs)
    recorded = {"_class_path": f"datamodules.{type(dm).__name__}", **dict(dm.hparams)}
    for rebuilt in (build_datamodule(**recorded), DATASETS[name](**dict(dm.hparams))):
        assert type(rebuilt) is type(dm) and list(rebuilt.hparams.items()) == list(dm.hparams.items())
        assert rebuilt.image_shape == dm.image_shape and len(rebuilt.subspaces()) == len(dm.subspaces())
        assert (rebuilt.subspace_block, rebuilt.subspace_step) == (dm.subspace_block, dm.subspace_step)
        assert repr(rebuilt.frequency_transform) == repr(dm.frequency_transform)
        if name != "imagenet":  # ImageNet counts its class folders (no data here)
            assert rebuilt.num_classes == dm.num_classes
        if name == "imagenet" or kwargs.get("transform", "none") in ("none", "flip"):  # no data needed
            torch.testing.assert_close(rebuilt.normalization().mean, dm.normalization().mean, rtol=0, atol=0)
    if name == "synthetic":  # generated from its arguments: the same data and training statistics
        rebuilt = build_datamodule(**recorded)
        assert torch.equal(rebuilt.test_tensors[0], dm.test_tensors[0]) and torch.equal(rebuilt.direction, dm.direction)
        assert torch.equal(rebuilt.normalization().std, dm.normalization().std)
    with pytest.raises(TypeError, match="unexpected arguments"):
        DATASETS[name](**dict(dm.hparams), colour=True)


def test_mnist_reader_equals_torchvision_on_raw_and_legacy_files(tiny_mnist, tmp_path):
    root, _ = tiny_mnist
    for train in (True, False):
        images, labels = read_mnist(root, train)
        reference = MNIST(str(root), train=train, download=False)
        assert images.dtype == torch.uint8 and torch.equal(images, reference.data)
        assert labels.dtype == torch.int64 and torch.equal(labels, reference.targets)
    legacy = tmp_path / "legacy"
    (legacy / "MNIST" / "processed").mkdir(parents=True)
    for train, name in ((True, "training.pt"), (False, "test.pt")):  # torchvision's old layout, read first
        torch.save(read_mnist(root, train), legacy / "MNIST" / "processed" / name)
    legacy_dm, raw_dm = MNISTDataModule(data_dir=str(legacy)), MNISTDataModule(data_dir=str(root))
    assert torch.equal(legacy_dm.test_tensors[0], raw_dm.test_tensors[0])
    assert torch.equal(legacy_dm.train_tensors[0], raw_dm.train_tensors[0])
    np.testing.assert_array_equal(legacy_dm.test_tensors[1], read_mnist(root, False)[1])


class _TinyModel(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(16 * 16, 2)

    def training_step(self, batch, _):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y)

    def validation_step(self, batch, _):
        x, y = batch
        self.log("val_loss", torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_dataloaders_shuffle_seeded_and_checkpoint_records_dataset(tmp_path):
    def make(seed: int) -> SyntheticDataModule:
        dm = SyntheticDataModule(image_shape=(1, 16, 16), num_train=64, num_test=32, batch_size=16, seed=seed)
        dm.setup("fit")
        return dm

    a, b = make(0), make(0)
    loader = a.train_dataloader()
    assert isinstance(loader.sampler, RandomSampler) and isinstance(a.val_dataloader().sampler, SequentialSampler)
    first = next(iter(loader))[0]
    assert torch.equal(first, next(iter(b.train_dataloader()))[0])
    assert not torch.equal(first, a.train_tensors[0][:16])  # shuffled
    trainer = L.Trainer(
        max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(_TinyModel(), datamodule=make(0))
    path = tmp_path / "tiny.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["datamodule_hyper_parameters"]
    assert (
        saved["dataset"] == "synthetic" and saved["transform"] == "none" and tuple(saved["image_shape"]) == (1, 16, 16)
    )
    restored = SyntheticDataModule.load_from_checkpoint(path)
    assert restored.image_shape == (1, 16, 16) and build_datamodule(**saved).hparams["num_train"] == 64
    assert list(saved.items()) == list(a.hparams.items())  # the checkpoint records hparams as they were
    for rebuilt in (restored, build_datamodule(**saved)):  # the same datamodule, hparams in the same order
        assert list(rebuilt.hparams.items()) == list(a.hparams.items())
        assert torch.equal(rebuilt.test_tensors[0], a.test_tensors[0])
