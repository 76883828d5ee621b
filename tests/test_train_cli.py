"""Output folders of train.py: everything under --trainer.default_root_dir, one version folder per run."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import train

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config", str(REPO / "configs" / "synthetic_lenet.yaml"),
    "--data.init_args.num_train", "128", "--data.init_args.num_test", "32", "--data.init_args.batch_size", "64",
    "--data.init_args.image_shape", "[1, 16, 16]", "--margin.rows.num_samples", "2", "--margin.every_n_epochs", "1",
    "--margin.log_figure", "false", "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false",
]  # fmt: skip


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_default_root_dir_alone_moves_every_output(tmp_path, monkeypatch, capsys):
    cwd, root = tmp_path / "cwd", tmp_path / "root"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    args = ["fit", *TINY, "--trainer.default_root_dir", str(root)]
    train.main(args)
    train.main(args)
    out = capsys.readouterr().out  # the end of each fit names the run folder and its checkpoints
    for version in ("version_0", "version_1"):
        run = root / "synthetic_lenet" / version
        assert f"run folder:      {run}\nTensorBoard:     tensorboard --logdir {root}\n" in out
        assert f"best checkpoint: {run}/checkpoints/epoch=0-step=2.ckpt (latest; no monitor)" in out
        assert f"last checkpoint: {run}/checkpoints/last.ckpt" in out
    assert list(cwd.iterdir()) == []  # no lightning_logs/, logs/ or checkpoints beside the user
    written = files_under(root)
    for version in ("version_0", "version_1"):  # experiment name in the path, checkpoints inside the version
        run = f"synthetic_lenet/{version}"
        assert {f"{run}/checkpoints/last.ckpt", f"{run}/config.yaml", f"{run}/hparams.yaml"} <= written
        assert any(name.startswith(f"{run}/margins/epoch_000/") for name in written)
    assert all(name.startswith("synthetic_lenet/version_") for name in written)
    saved = torch.load(root / "synthetic_lenet/version_1/checkpoints/last.ckpt", map_location="cpu")
    assert saved["global_step"] == 2


def test_logger_save_dir_defaults_to_logs_and_explicit_values_win(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = train.main(TINY, run=False)
    assert cli.trainer.default_root_dir == "logs" and cli.trainer.logger.save_dir == "logs"
    assert cli.trainer.logger.name == "synthetic_lenet"
    cli = train.main([*TINY, "--trainer.logger.init_args.save_dir", "elsewhere"], run=False)
    assert cli.trainer.logger.save_dir == "elsewhere"
    assert list(tmp_path.iterdir()) == []  # instantiating alone reserves no version folder


def test_concurrent_version_reservations_never_collide(tmp_path):
    (tmp_path / "version_3").mkdir()
    (tmp_path / "version_x").mkdir()
    barrier, got = threading.Barrier(8), []

    def reserve():
        barrier.wait()
        got.append(train.reserve_version(tmp_path))

    threads = [threading.Thread(target=reserve) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(4, 12))


def test_test_run_names_its_folder_the_tested_weights_and_the_margins(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    train.main(["fit", *TINY])
    ckpt = tmp_path / "logs/synthetic_lenet/version_0/checkpoints/last.ckpt"
    capsys.readouterr()
    train.main(["test", *TINY, "--ckpt_path", str(ckpt)])
    out = capsys.readouterr().out
    folder = Path("logs/synthetic_lenet/version_1")
    assert "margins test, epoch 0: 2 samples x 9 subspaces in " in out
    assert f" -> {folder}/margins/test_epoch_000\n" in out
    assert f"run folder:      {folder}\nTensorBoard:     tensorboard --logdir logs\ntested weights:  {ckpt}" in out


# ---- user errors: one line `error: ...`, exit 2, nothing left behind --------------------------------------------
EVIL = """
import os, sys, torch
class Payload:
    def __reduce__(self):
        return (open, (sys.argv[2], "w"))  # unpickling it would create the marker file
torch.save({"state_dict": {}, "pytorch-lightning_version": "2.6.6", "payload": Payload()}, sys.argv[1])
"""


def run_cli(args: list[str], capsys) -> tuple[int, list[str]]:
    """train.py's command line in this process: exit status and the lines it wrote to stderr."""
    code = train.cli(args)
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "flags, words",
    [(["--data.num_workers", "-1"], "num_workers must be >= 0"),
     (["--data.batch_size", "0"], "batch sizes must be positive, got batch_size=0"),
     (["--trainer.devices", "0"], "Trainer(devices='0')` value is not a valid input"),
     (["--trainer.max_epochs", "x"], "trainer.max_epochs: expected int or None, got 'x'"),
     (["--ckpt_path", "missing.ckpt"], "checkpoint file not found: missing.ckpt"),
     (["--margin.rows.num_samples", "0"], "num_samples must be >= 1 (--margin.rows.num_samples), got 0")],
)  # fmt: skip
def test_a_bad_value_is_one_line_exit_2_and_leaves_no_folder(tmp_path, monkeypatch, capsys, flags, words):
    monkeypatch.chdir(tmp_path)
    code, err = run_cli(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path / "runs"), *flags], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert list(tmp_path.iterdir()) == []  # neither runs/ nor runs/synthetic_lenet/ nor a version folder


def test_missing_mnist_is_one_line_naming_the_flag_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs" / "mnist_lenet.yaml")
    args = ["fit", "--config", config, "--trainer.default_root_dir", str(tmp_path / "runs"), "--trainer.max_steps", "1",
            "--data.data_dir", str(tmp_path / "none")]  # fmt: skip
    code, err = run_cli(args, capsys)
    assert code == 2 and len(err) == 1 and "MNIST not found" in err[0] and "--data.download true" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_holding_pickled_objects_is_refused_and_names_the_flag_that_trusts_it(tmp_path, capsys):
    evil, marker = tmp_path / "evil.ckpt", tmp_path / "payload-ran"
    subprocess.run([sys.executable, "-c", EVIL, str(evil), str(marker)], check=True, timeout=120)
    (tmp_path / "runs" / "synthetic_lenet").mkdir(parents=True)  # an existing experiment folder stays
    args = ["fit", *TINY, "--trainer.default_root_dir", str(tmp_path / "runs"), "--ckpt_path", str(evil)]
    code, err = run_cli(args, capsys)
    assert code == 2 and len(err) == 1, err
    assert re.match(rf"error: --ckpt_path {evil} holds pickled Python objects \((builtins|io)\.open\)", err[0]), err
    assert "can run arbitrary code" in err[0] and err[0].endswith("pass --weights_only false")
    assert not marker.exists()  # refused before anything was unpickled
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["synthetic_lenet"]
    assert list((tmp_path / "runs" / "synthetic_lenet").iterdir()) == []


def test_a_checkpoint_that_is_not_a_lightning_one_is_one_line(tmp_path, capsys):
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "weights.pt")
    args = [
        "fit",
        *TINY,
        "--trainer.default_root_dir",
        str(tmp_path / "runs"),
        "--ckpt_path",
        str(tmp_path / "weights.pt"),
    ]
    code, err = run_cli(args, capsys)
    assert code == 2 and len(err) == 1 and "is not a checkpoint of a Lightning run (it holds top-level keys" in err[0]


# ---- a mistyped key: one line, the nearest valid key first --------------------------------------------------
@pytest.mark.parametrize(
    "flags, config, expected",
    [(["--trainer.max_epoch", "1"], None,
      "--trainer.max_epoch is not an option; did you mean --trainer.max_epochs (or "),
     (["--margin.rows.num_sample", "7"], None,
      "--margin.rows.num_sample is not an option; did you mean --margin.rows.num_samples"),
     (["--data.init_args.batch_siz", "8"], None,
      "data.init_args.batch_siz is not a setting of datamodules.SyntheticDataModule; did you mean "
      "data.init_args.batch_size (or "),
     ([], "trainer:\n  max_epoch: 1\n", "trainer.max_epoch is not a config key; did you mean trainer.max_epochs (or "),
     ([], "model:\n  init_args:\n    lrr: 0.1\n",
      "model.init_args.lrr is not a setting of lightning_modules.ClassifierModule; did you mean model.init_args.lr ")],
)  # fmt: skip
def test_a_mistyped_key_is_one_line_with_the_nearest_valid_key_first(tmp_path, capsys, flags, config, expected):
    extra = flags
    if config is not None:
        (tmp_path / "typo.yaml").write_text(config)
        extra = ["--config", str(tmp_path / "typo.yaml")]
    code, err = run_cli(["fit", *TINY, "--trainer.default_root_dir", str(tmp_path / "runs"), *extra], capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith(f"error: {expected}"), err
    assert not (tmp_path / "runs").exists()
