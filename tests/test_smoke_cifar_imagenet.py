"""End-to-end smoke tests of the CIFAR-10 and ImageNet paths on the real sample images: train a step with the
experiment's config, measure margins at validation end and with evaluate_margin.py, and plot."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

import evaluate_margin
import train
from margins import read_report


def cifar_from_samples(root: Path, samples_dir: Path) -> None:
    """The four CIFAR-10 sample PNGs in torchvision's pickle layout (every batch holds the same four images)."""
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted((samples_dir / "CIFAR10").glob("*.png"))]
    data = np.stack([im.transpose(2, 0, 1).reshape(-1) for im in images]).astype(np.uint8)  # [4, 3072]
    labels = list(range(len(images)))
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def imagenet_from_samples(root: Path, samples_dir: Path) -> None:
    pngs = sorted((samples_dir / "ImageNet").glob("*.png"))
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"class{c}").mkdir(parents=True)
            for k in range(2):
                shutil.copy(pngs[2 * c + k], root / split / f"class{c}" / f"img{k}.png")


def fit_one_step(config: str, data_dir: Path, logs: Path, extra: list[str]) -> Path:
    train.main(
        ["fit", "--config", f"configs/{config}.yaml", "--data.data_dir", str(data_dir),
         "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
         "--trainer.num_sanity_val_steps", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.logger.init_args.save_dir", str(logs),
         "--margin.rows.num_samples", "2", "--margin.attack.max_iter", "3", "--margin.every_n_epochs", "1", *extra]
    )  # fmt: skip
    return next(logs.rglob("last.ckpt"))


def check_outputs(directory: Path, num_subspaces: int, num_samples: int) -> None:
    saved = read_report(directory)
    assert saved.margins.shape == (num_subspaces, num_samples)
    assert np.isfinite(saved.margins).all() and (saved.margins > 0).all()
    assert saved.perturbed_labels.shape == saved.iterations.shape == saved.margins.shape
    assert saved.targets.shape == saved.predicted.shape == (num_samples,)
    png = directory / "margins.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Image.open(png).size[0] > 100


@pytest.mark.slow
def test_cifar10_flipped_path_end_to_end(tmp_path, samples_dir, monkeypatch):
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    cifar_from_samples(tmp_path / "data", samples_dir)
    ckpt = fit_one_step("cifar10_flipped_resnet18", tmp_path / "data", tmp_path / "logs", ["--data.batch_size", "4"])
    check_outputs(next((tmp_path / "logs").rglob("margins/epoch_000")), 13, 2)
    out = tmp_path / "eval"
    code = evaluate_margin.main(
        ["--checkpoint", str(ckpt), "--num-samples", "3", "--max-iter", "3", "--output-dir", str(out), "--no-progress"]
    )
    assert code == 0
    check_outputs(out, 13, 3)
    assert read_report(out).settings["transform"] == "flip"


@pytest.mark.slow
def test_imagenet_path_end_to_end(tmp_path, samples_dir):
    imagenet_from_samples(tmp_path / "data", samples_dir)
    extra = ["--data.batch_size", "2", "--data.num_workers", "0", "--margin.rows.num_samples", "1"]
    ckpt = fit_one_step("imagenet_flipped_resnet50", tmp_path / "data", tmp_path / "logs", extra)
    check_outputs(next((tmp_path / "logs").rglob("margins/epoch_000")), 14, 1)
    out = tmp_path / "eval"
    args = ["--checkpoint", str(ckpt), "--num-samples", "2", "--max-iter", "2", "--subspace-dim", "112",
            "--subspace-step", "112", "--output-dir", str(out), "--no-progress"]  # fmt: skip
    assert evaluate_margin.main(args) == 0
    check_outputs(out, 2, 2)
