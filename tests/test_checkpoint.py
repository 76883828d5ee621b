"""models.checkpoint: what a bad file is not (one line each, no traceback), kind detection, and the CLI's exit 2.

References: files built here byte by byte (random bytes, a cut zip, text, empty) and checkpoints saved with torch.save.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

import evaluate_margin
from margins.inputs import default_output_dir
from models import (
    CheckpointReadError,
    UntrustedCheckpointError,
    build_model,
    checkpoint_kind,
    inspect_checkpoint,
    read_checkpoint,
)


def _random_files(root: Path, count: int = 50) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        size = int(rng.integers(1, 5000))
        data = rng.integers(0, 256, size=size, dtype=np.uint8).tobytes()
        if i % 10 == 0:
            data = b"\x80\x02" + data  # looks like a pickle stream
        elif i % 10 == 1:
            data = b"PK\x03\x04" + data  # looks like a zip archive
        path = root / f"random_{i}.bin"
        path.write_bytes(data)
        paths.append(path)
    return paths


def test_random_bytes_each_get_one_line_saying_what_the_file_is_not(tmp_path):
    for path in _random_files(tmp_path):
        with pytest.raises(CheckpointReadError) as info:
            read_checkpoint(path)
        message = str(info.value)
        assert "\n" not in message and "is not" in message and str(path) in message, message
        assert "pickled Python objects" not in message  # the old, misleading diagnosis


def test_known_kinds_of_bad_files(tmp_path):
    torch.save(build_model("lenet").state_dict(), tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "notes.txt").write_text("epoch,loss\n1,0.5\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    expected = {
        "truncated.pt": "truncated or corrupt zip archive",
        "notes.txt": "is a text file (first line: 'epoch,loss')",
        "empty.pt": "is an empty file (0 bytes)",
        "missing.pt": "checkpoint file not found",
    }
    for name, phrase in expected.items():
        with pytest.raises(CheckpointReadError, match=r"^[^\n]*$") as info:
            read_checkpoint(tmp_path / name)
        assert phrase in str(info.value), str(info.value)
    assert read_checkpoint(tmp_path / "good.pt").keys() == build_model("lenet").state_dict().keys()


def test_cli_gives_exit_2_and_one_line_for_each_bad_file(tmp_path, tiny_mnist_root, capsys):
    files = _random_files(tmp_path, 4)
    (tmp_path / "notes.txt").write_text("hello\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    for path in [*files, tmp_path / "notes.txt", tmp_path / "empty.pt"]:
        argv = ["--model", "lenet", "--dataset", "mnist", "--checkpoint", str(path), "--data-dir", str(tiny_mnist_root)]
        code = evaluate_margin.main([*argv, "--output-dir", str(tmp_path / "out")])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {path} is not"), err
    assert not (tmp_path / "out").exists()


def test_kind_detection_and_pickle_refusal(tmp_path):
    sd = build_model("lenet").state_dict()
    torch.save({"state_dict": {f"model.net.{k}": v for k, v in sd.items()}, "hyper_parameters": {"net": "lenet"}},
               tmp_path / "run.ckpt")  # fmt: skip
    torch.save({"model": {f"module.model.{k}": v for k, v in sd.items()}}, tmp_path / "madry.pt")
    torch.save(sd, tmp_path / "model.t7")
    kinds = {name: inspect_checkpoint(tmp_path / name).kind for name in ("run.ckpt", "madry.pt", "model.t7")}
    assert kinds == {"run.ckpt": "lightning", "madry.pt": "madrylab", "model.t7": "state_dict"}
    assert inspect_checkpoint(tmp_path / "run.ckpt").model_hparams == {"net": "lenet"}
    with pytest.raises(CheckpointReadError, match="top-level keys are: epoch"):
        checkpoint_kind({"epoch": 3}, tmp_path / "x")
    torch.save({"args": argparse.Namespace(arch="resnet50")}, tmp_path / "pickled.pt")
    with pytest.raises(UntrustedCheckpointError, match="--trusted-pickle"):
        read_checkpoint(tmp_path / "pickled.pt")
    assert read_checkpoint(tmp_path / "pickled.pt", trusted_pickle=True)["args"].arch == "resnet50"


def test_default_output_dir_names_model_dataset_transform_and_run(tiny_mnist_root):
    from datamodules import MNISTDataModule

    dm = MNISTDataModule(data_dir=str(tiny_mnist_root))
    ckpt = Path("logs/mnist_lenet/version_3/checkpoints/last.ckpt")
    assert default_output_dir("lenet", dm, ckpt) == Path("outputs/margins/lenet_mnist_mnist_lenet-version_3-last")
    flipped = MNISTDataModule(data_dir=str(tiny_mnist_root), transform="flip")
    assert default_output_dir("lenet", flipped, Path("/x/flipped/model.t7")).name == "lenet_mnist_flip_flipped-model"
