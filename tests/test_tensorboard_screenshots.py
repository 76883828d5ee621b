"""scripts/tensorboard_screenshots.py without Chromium or training: arguments, the missing-Chromium line, the runs of
a given folder, PNG sizes."""

from __future__ import annotations

import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from scripts import tensorboard_screenshots as shots

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_regenerate_docs_call():
    args = shots.parse_args([])
    assert args.data_dir == REPO.parent / "shared" / "data"
    assert args.out == REPO / "docs"
    assert args.chromium is None and args.runs is None
    args = shots.parse_args(["--data-dir", "data", "--out", "somewhere"])  # as scripts/regenerate_docs.py calls it
    assert args.data_dir == Path("data") and args.out == Path("somewhere")
    assert shots.parse_args(["--runs", "logs"]).runs == Path("logs")
    assert set(shots.SHOTS) == {f"tensorboard_{page}.png" for page in ("margins", "scalars", "images", "hparams")}


@pytest.mark.parametrize("explicit", [False, True])
def test_missing_chromium_is_one_line_and_exit_2(explicit, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(shots.shutil, "which", lambda name: None)
    monkeypatch.setattr(shots, "DEFAULT_CHROMIUM", tmp_path / "chromium")
    monkeypatch.setattr(shots, "fit", lambda *a: pytest.fail("trained without Chromium"))
    argv = ["--out", str(tmp_path / "out")] + (["--chromium", str(tmp_path / "chrome")] if explicit else [])
    with pytest.raises(SystemExit) as e:
        shots.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: headless Chromium not found")
    assert "apt-get install -y chromium" in err
    assert not (tmp_path / "out").exists()


def test_runs_of_a_folder_are_its_event_folders_and_none_is_one_line_and_exit_2(monkeypatch, tmp_path, capsys):
    for run in ("mnist_lenet/version_0", "mnist_lenet/version_1", "mnist_flipped_lenet/version_0"):
        (tmp_path / "logs" / run).mkdir(parents=True)
        (tmp_path / "logs" / run / "events.out.tfevents.1.host.1.0").write_bytes(b"")
    (tmp_path / "logs" / "mnist_lenet" / "version_0" / "margins").mkdir()  # no events: not a run
    assert shots.run_names(tmp_path / "logs") == [
        "mnist_flipped_lenet/version_0", "mnist_lenet/version_0", "mnist_lenet/version_1"]  # fmt: skip

    monkeypatch.setattr(shots, "find_chromium", lambda explicit: tmp_path / "chromium")
    monkeypatch.setattr(shots, "fit", lambda *a: pytest.fail("trained although --runs was given"))
    with pytest.raises(SystemExit) as e:
        shots.main(["--runs", str(tmp_path / "empty"), "--out", str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: no TensorBoard runs") and "--runs logs" in err
    assert not (tmp_path / "out").exists()


def test_png_size(tmp_path):
    ihdr = struct.pack(">IIBBBBB", 1920, 300, 8, 2, 0, 0, 0)
    png = tmp_path / "a.png"
    png.write_bytes(
        b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    )
    assert shots.png_size(png) == (1920, 300)
    (tmp_path / "b.png").write_bytes(b"not a png")
    with pytest.raises(shots.ScreenshotError):
        shots.png_size(tmp_path / "b.png")


def test_help_runs_as_a_script():
    done = subprocess.run([sys.executable, "scripts/tensorboard_screenshots.py", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0 and "--data-dir" in done.stdout
