"""Output folders of train.py: everything under --trainer.default_root_dir, one version folder per run."""

from __future__ import annotations

import threading
from pathlib import Path

import torch

import train

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config", str(REPO / "configs" / "synthetic_lenet.yaml"),
    "--data.init_args.num_train", "128", "--data.init_args.num_test", "32", "--data.init_args.batch_size", "64",
    "--data.init_args.image_shape", "[1, 16, 16]", "--margin.num_samples", "2", "--margin.every_n_epochs", "1",
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
