"""frequency_analysis.py: map2d and random are margin evaluations like evaluate_margin.py (the same result folders,
processes, resume and flags), heatmap keeps its own loop; deprecated flag names still work with a warning line.

Data: a LeNet briefly trained on 1x16x16 synthetic data (no dataset files needed), saved as a Lightning checkpoint
by a fit that also ran the margin callback. References: evaluate_margin.py / `evaluate_margins` on the same
checkpoint and settings (the same bits), numpy medians for the 2-D map and the spreads, the commands' own
uninterrupted and single-process runs for resumed and 2-process ones.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch

import evaluate_margin
import frequency_analysis
from analysis.export import export_per_sample_csv
from callbacks import MarginCallback
from datamodules import SyntheticDataModule
from frequency import DCTGridSubspaces
from frequency.random_subspaces import RandomSubspaces
from lightning_modules import ClassifierModule
from margins import read_report
from margins.inputs import describe_family
from margins.run.evaluate import evaluate_margins
from margins.settings import AttackSettings, RowSettings, RunSettings
from tests.conftest import REPO

ARRAYS = ("margins", "converged", "iterations", "perturbed_labels", "indices", "predicted", "targets")
STANDARD = {*(f"{name}.npy" for name in ARRAYS), "summary.json"}  # every result folder, whichever command
GRID = (3, 3)  # 8x8 DCT blocks with stride 4 on 16x16 images


def files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir() if p.is_file()}


def assert_same_arrays(a: Path, b: Path) -> None:
    for name in ARRAYS:
        assert (a / f"{name}.npy").read_bytes() == (b / f"{name}.npy").read_bytes(), (a, name)


def chunk_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "chunks").glob("chunk-*.npz"))}


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    """The checkpoint of a one-epoch fit on synthetic data, and the margin callback's folder of that fit."""
    root = tmp_path_factory.mktemp("trained")
    L.seed_everything(0)
    data = SyntheticDataModule(image_shape=(1, 16, 16), num_train=256, num_test=32, eps=4.0, sigma=1.0, batch_size=64)
    module = ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16), lr=0.05, schedule="constant")
    callback = MarginCallback(
        rows=RowSettings(num_samples=3),
        attack=AttackSettings(max_iter=10, chunk_rows=8),
        log_figure=False,
        progress=False,
    )
    trainer = L.Trainer(
        max_epochs=1, num_sanity_val_steps=0, logger=False, accelerator="cpu", default_root_dir=root,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(root / "synthetic.ckpt")
    return SimpleNamespace(root=root, ckpt=root / "synthetic.ckpt", callback=root / "margins" / "epoch_000")


def common(trained: SimpleNamespace) -> list[str]:
    return ["--checkpoint", str(trained.ckpt), "--num-samples", "3", "--max-iter", "10", "--chunk-rows", "8",
            "--threads", "1", "--no-progress"]  # fmt: skip


def main(argv: list, capsys) -> tuple[int, str, str]:
    code = frequency_analysis.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def runs(trained, tmp_path_factory) -> SimpleNamespace:
    """map2d, random (with --count 3) and evaluate_margin.py on the checkpoint, one process each."""
    root = tmp_path_factory.mktemp("runs")
    flags = common(trained)
    assert frequency_analysis.main(["map2d", *flags, "--subspace-dim", "8", "--subspace-step", "4",
                                    "--output-dir", str(root / "map2d")]) == 0  # fmt: skip
    assert frequency_analysis.main(["random", *flags, "--count", "3", "--output-dir", str(root / "random")]) == 0
    assert evaluate_margin.main([*flags, "--output-dir", str(root / "evaluate")]) == 0
    return SimpleNamespace(map2d=root / "map2d", random=root / "random", evaluate=root / "evaluate")


# ---- what map2d and random write -------------------------------------------------------------------------------
def test_map2d_writes_a_standard_result_folder_and_its_map(trained, runs, tmp_path):
    folder = runs.map2d
    assert files(folder) == STANDARD | {"map2d.npy", "map2d.png"}  # no margins.png: a grid gets its map instead
    report = read_report(folder)
    assert report.margins.shape == (GRID[0] * GRID[1], 3) and report.iterations.shape == report.margins.shape
    grid = np.load(folder / "map2d.npy")
    np.testing.assert_allclose(grid, np.median(report.margins, axis=1).reshape(GRID), rtol=1e-6)
    assert (folder / "map2d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    family = DCTGridSubspaces((1, 16, 16), 8, 4)
    described = json.loads(json.dumps(describe_family(family)))
    assert {k: report.settings[k] for k in described} == described
    assert report.settings["source"] == "frequency_analysis" and report.settings["command"][:2] == [
        "frequency_analysis.py",
        "map2d",
    ]
    # the same evaluation from Python: the same bits
    same, _ = evaluate_margins(
        trained.ckpt,
        rows=RowSettings(subspace="grid", subspace_dim=8, subspace_step=4, num_samples=3),
        attack=AttackSettings(max_iter=10, chunk_rows=8),
        run=RunSettings(accelerator="cpu", progress=False, threads=1),
        output_dir=tmp_path / "python",
    )
    assert_same_arrays(folder, tmp_path / "python")
    # the per-sample CSV: the label column from targets.npy
    rows = list(csv.DictReader(export_per_sample_csv(folder, tmp_path / "x.csv").open()))
    assert len(rows) == 27 and all(r["iterations"] and r["predicted"] and r["perturbed_label"] for r in rows)
    assert [int(r["label"]) for r in rows[:3]] == same.targets.tolist()


def test_random_writes_standard_folders_its_plot_and_the_spreads(trained, runs, tmp_path, capsys):
    out = runs.random
    assert files(out) == {"dct_vs_random.png", "analysis.json"}
    assert {p.name for p in out.iterdir() if p.is_dir()} == {"dct", "random"}
    dct, control = read_report(out / "dct"), read_report(out / "random")
    for folder in (out / "dct", out / "random"):
        assert files(folder) == STANDARD | {"margins.png"}
    assert dct.settings["subspace"] == "dct" and dct.margins.shape == (9, 3)  # 8x8 blocks, step 1 on 16x16
    family = RandomSubspaces((1, 16, 16), 64, 3, seed=0)
    described = json.loads(json.dumps(describe_family(family)))
    assert {k: control.settings[k] for k in described} == described and control.margins.shape == (3, 3)
    np.testing.assert_array_equal(dct.indices, control.indices)
    analysis = json.loads((out / "analysis.json").read_text())
    spreads = analysis["spread_max_over_min_median"]
    for name, report in (("dct", dct), ("random", control)):
        medians = np.median(report.margins.astype(np.float64), axis=1)
        assert spreads[name] == pytest.approx(medians.max() / medians.min(), rel=1e-6)
    assert (out / "dct_vs_random.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_same_arrays(out / "dct", runs.evaluate)  # the DCT family: evaluate_margin.py's bits

    # user bases instead of random subspaces: a basis/ folder
    basis = torch.linalg.qr(torch.randn(256, 5, generator=torch.Generator().manual_seed(0))).Q
    np.save(tmp_path / "b.npy", basis.numpy())
    flags = [*common(trained), "--bases", tmp_path / "b.npy", "--output-dir", tmp_path / "bases"]
    code, stdout, _ = main(["random", *flags], capsys)
    assert code == 0 and "DCT" in stdout and "basis" in stdout
    assert files(tmp_path / "bases" / "basis") == STANDARD | {"margins.png"}
    report = read_report(tmp_path / "bases" / "basis")
    assert report.settings["subspace"] == "basis" and report.settings["subspace_size"] == 5
    assert set(json.loads((tmp_path / "bases" / "analysis.json").read_text())["spread_max_over_min_median"]) == {
        "dct",
        "basis",
    }


def test_every_result_folder_has_the_same_files_whichever_command_wrote_it(trained, runs):
    """evaluate_margin.py, frequency_analysis.py (map2d, random's two families) and the margin callback: the same
    arrays (names, dtypes, ranks) and summary.json listing them; figures: margins.png, or map2d's map."""
    folders = {
        "evaluate_margin.py": runs.evaluate,
        "map2d": runs.map2d,
        "random/dct": runs.random / "dct",
        "random/random": runs.random / "random",
        "callback": trained.callback,
    }
    extras = {"map2d": {"map2d.npy", "map2d.png"}}
    for name, folder in folders.items():
        assert files(folder) == STANDARD | extras.get(name, {"margins.png"}), name
        assert {p.name for p in folder.iterdir() if p.is_dir()} == {"chunks"}, name
        listed = set(json.loads((folder / "summary.json").read_text())["files"])
        assert listed == files(folder) - {"summary.json", "map2d.npy", "map2d.png"}, name
        report = read_report(folder)
        for array in ARRAYS:
            value = getattr(report, array)
            assert value is not None and value.ndim == (1 if array in ("indices", "predicted", "targets") else 2)
            assert value.dtype == {"margins": np.float32, "converged": np.bool_}.get(array, np.int64), (name, array)
    callback, cli = read_report(trained.callback), read_report(runs.evaluate)
    np.testing.assert_array_equal(callback.indices, cli.indices)  # the same samples: seed 0, 3 of the test split
    assert_same_arrays(trained.callback, runs.evaluate)  # and the same weights, settings and chunks: the same bits


# ---- processes, resume, flags --------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["map2d", "random"])
def test_two_processes_write_the_same_bytes_as_one(trained, runs, tmp_path, command):
    """`--accelerator cpu --devices 2` (Lightning's DDP, gloo; about 12 s): the chunks are shared out, the files
    are the 1-process run's byte for byte (arrays, figures, chunk files)."""
    out = tmp_path / command
    extra = ["--subspace-dim", "8", "--subspace-step", "4"] if command == "map2d" else ["--count", "3"]
    argv = [command, *common(trained), *extra, "--accelerator", "cpu", "--devices", "2", "--output-dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "frequency_analysis.py"), *argv],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("results:") == 1  # rank 0 reports, rank 1 prints nothing
    single = runs.map2d if command == "map2d" else runs.random
    pairs = [(single, out)] if command == "map2d" else [(single / k, out / k) for k in ("dct", "random")]
    for one, two in pairs:
        assert files(one) == files(two)
        assert_same_arrays(one, two)
        for name in files(one) - STANDARD:  # figures and the map
            assert (one / name).read_bytes() == (two / name).read_bytes(), name
        assert chunk_bytes(one) == chunk_bytes(two)
        assert read_report(two).settings["subspace_sha256"] == read_report(one).settings["subspace_sha256"]
    journals = {p.name for one, two in pairs for p in (two / "chunks").glob("journal-rank*.jsonl")}
    assert journals == {"journal-rank0.jsonl", "journal-rank1.jsonl"}  # both processes attacked chunks
    if command == "random":
        assert (single / "dct_vs_random.png").read_bytes() == (out / "dct_vs_random.png").read_bytes()
        spreads = [json.loads((d / "analysis.json").read_text())["spread_max_over_min_median"] for d in (single, out)]
        assert spreads[0] == spreads[1]


def test_interrupted_map2d_resumes_from_its_committed_chunks(trained, runs, tmp_path, capsys):
    """What a kill before the merge leaves (committed chunks, no summary), with two chunks lost (their files and
    journal lines gone) and a half-written chunk: the same command recomputes only those and writes the
    uninterrupted run's bytes; a finished folder is replaced only with --overwrite."""
    out = tmp_path / "resumed"
    shutil.copytree(runs.map2d, out)
    for name in (*STANDARD, "map2d.npy", "map2d.png"):
        (out / name).unlink()
    chunks = out / "chunks"
    assert len(chunk_bytes(out)) == 4  # 3 samples x 9 subspaces in chunks of 8 rows
    for chunk in (1, 3):
        (chunks / f"chunk-{chunk:06d}.npz").unlink()
    journal = chunks / "journal-rank0.jsonl"
    kept = [line for line in journal.read_text().splitlines() if json.loads(line)["chunk"] not in (1, 3)]
    journal.write_text("\n".join(kept) + "\n")
    (chunks / ".chunk-000001.npz.tmp-dead").write_bytes(b"half")
    untouched = {p.name: p.stat().st_mtime_ns for p in chunks.glob("chunk-*.npz")}

    flags = [*common(trained), "--subspace-dim", "8", "--subspace-step", "4", "--output-dir", out]
    code, stdout, _ = main(["map2d", *flags], capsys)
    assert code == 0 and "2-D map (3, 3)" in stdout
    assert {p.name: p.stat().st_mtime_ns for p in chunks.glob("chunk-*.npz") if p.name in untouched} == untouched
    assert chunk_bytes(out) == chunk_bytes(runs.map2d) and not list(chunks.glob(".*tmp*"))
    assert_same_arrays(runs.map2d, out)
    assert (out / "map2d.npy").read_bytes() == (runs.map2d / "map2d.npy").read_bytes()
    redone = [json.loads(line)["chunk"] for line in journal.read_text().splitlines()]
    assert sorted(redone) == [0, 1, 2, 3] and redone[-2:] == [1, 3]  # only the lost chunks were attacked

    before = (out / "summary.json").read_bytes()
    code, stdout, stderr = main(["map2d", *flags], capsys)
    assert code == 2 and stdout == "" and "already holds a finished evaluation" in stderr and "--overwrite" in stderr
    assert (out / "summary.json").read_bytes() == before
    code, _, _ = main(["map2d", *flags[:-2], "--max-iter", "5", "--output-dir", out, "--overwrite"], capsys)
    assert code == 0 and read_report(out).settings["max_iter"] == 5


def test_random_stopped_after_its_dct_part_resumes_the_random_part(trained, runs, tmp_path, capsys):
    """What a kill during the random part leaves: dct/ finished, random/ with a committed chunk and no results.
    The same command reuses the DCT results (not a byte touched), attacks only the random part's missing chunk and
    writes the uninterrupted run's files; once finished, a rerun is refused as for any finished evaluation."""
    out = tmp_path / "random"
    shutil.copytree(runs.random, out)
    for name in ("analysis.json", "dct_vs_random.png"):
        (out / name).unlink()
    for name in (*STANDARD, "margins.png"):
        (out / "random" / name).unlink()
    chunks = out / "random" / "chunks"
    (chunks / "chunk-000001.npz").unlink()  # 3 samples x 3 subspaces in chunks of 8 rows: 2 chunks, one left
    journal = chunks / "journal-rank0.jsonl"
    journal.write_text("".join(line + "\n" for line in journal.read_text().splitlines() if '"chunk": 1,' not in line))
    dct = {p: p.stat().st_mtime_ns for p in (out / "dct").rglob("*")}
    kept = (chunks / "chunk-000000.npz").stat().st_mtime_ns

    flags = [*common(trained), "--count", "3", "--output-dir", out]
    code, stdout, stderr = main(["random", *flags], capsys)
    assert code == 0, stderr
    assert {p: p.stat().st_mtime_ns for p in (out / "dct").rglob("*")} == dct
    assert (chunks / "chunk-000000.npz").stat().st_mtime_ns == kept
    assert [json.loads(line)["chunk"] for line in journal.read_text().splitlines()] == [0, 1]
    for kind in ("dct", "random"):
        assert_same_arrays(runs.random / kind, out / kind)
    spreads = [json.loads((d / "analysis.json").read_text())["spread_max_over_min_median"] for d in (out, runs.random)]
    assert spreads[0] == spreads[1]
    assert "max/min of per-subspace median" in stdout
    code, stdout, stderr = main(["random", *flags], capsys)
    assert code == 2 and "already holds a finished evaluation" in stderr and "--overwrite" in stderr


def test_a_full_disk_while_writing_the_2d_map_is_one_line_and_a_rerun_finishes(trained, runs, tmp_path, monkeypatch,
                                                                              capsys):  # fmt: skip
    """map2d's own files after the result folder: a full disk there is one line (exit 2), nothing half-written,
    and the same command then writes them from the finished evaluation (nothing measured again)."""
    from tests.test_no_hang import FullDisk

    out = tmp_path / "map2d"
    flags = [*common(trained), "--subspace-dim", "8", "--subspace-step", "4", "--output-dir", out]
    disk = FullDisk(monkeypatch, r"map2d\.(png|npy)", errno_less=True)
    code, _, stderr = main(["map2d", *flags], capsys)
    assert disk.failed and code == 2 and stderr.startswith(f"error: no space left on the disk holding {out}"), stderr
    assert len(stderr.strip().splitlines()) == 1 and not list(out.glob("map2d*")) and not list(out.glob(".*tmp*"))
    monkeypatch.undo()
    summary = (out / "summary.json").read_bytes()
    code, stdout, _ = main(["map2d", *flags], capsys)
    assert code == 0 and "2-D map (3, 3)" in stdout and (out / "summary.json").read_bytes() == summary
    assert (out / "map2d.npy").read_bytes() == (runs.map2d / "map2d.npy").read_bytes()
    assert (out / "map2d.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_deprecated_flags_warn_once_each_and_still_work(trained, runs, tmp_path, capsys):
    old = ["--checkpoint", trained.ckpt, "--num-samples", 3, "--max-iter", 10, "--threads", 1, "--no-progress"]
    argv = ["map2d", *old, "--block", 8, "--stride", 4, "--batch-size", 8, "--device", "cpu"]
    code, _, stderr = main([*argv, "--output-dir", tmp_path / "map2d"], capsys)
    assert code == 0
    warnings = [line for line in stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        "warning: --block is deprecated, use --subspace-dim",
        "warning: --stride is deprecated, use --subspace-step",
        "warning: --batch-size is deprecated, use --chunk-rows",
        "warning: --device is deprecated, use --accelerator/--devices",
    ]
    assert_same_arrays(runs.map2d, tmp_path / "map2d")  # what the new flags give
    settings = read_report(tmp_path / "map2d").settings
    assert (settings["subspace_dim"], settings["subspace_step"], settings["chunk_rows"]) == (8, 4, 8)

    argv = ["random", *old, "--count", 3, "--step", 1, "--batch-size", 8, "--output-dir", tmp_path / "random"]
    code, _, stderr = main(argv, capsys)
    assert code == 0 and "warning: --step is deprecated, use --subspace-step" in stderr.splitlines()
    for kind in ("dct", "random"):
        assert_same_arrays(runs.random / kind, tmp_path / "random" / kind)

    code, _, stderr = main(["map2d", *old, "--device", "tpu", "--output-dir", tmp_path / "tpu"], capsys)
    assert code == 2 and stderr.strip().splitlines()[-1].startswith("error: --device 'tpu': use --accelerator")
    assert not (tmp_path / "tpu").exists()


def test_heatmap_keeps_its_own_loop_and_refuses_to_overwrite(trained, tmp_path, capsys):
    flags = ["--checkpoint", trained.ckpt, "--num-samples", 4, "--eps", 2, "--no-progress", "--output-dir", tmp_path]
    code, _, stderr = main(["heatmap", *flags, "--accelerator", "cpu", "--images-per-pass", 64], capsys)
    assert code == 0 and "warning" not in stderr
    heat = np.load(tmp_path / "heatmap.npy")
    settings = json.loads((tmp_path / "heatmap.json").read_text())
    assert heat.shape == (16, 16) and settings["eps"] == 2.0 and settings["valid"] == "box"
    assert settings["device"] == "cpu" and settings["num_samples"] == 4 and len(settings["indices"]) == 4
    assert ((heat >= 0) & (heat <= 1)).all()
    np.testing.assert_allclose(heat, np.roll(heat[::-1, ::-1], (1, 1), axis=(0, 1)))  # U(i, j) = U(-i, -j)
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    before = (tmp_path / "heatmap.json").read_bytes()
    code, _, stderr = main(["heatmap", *flags], capsys)
    assert code == 2 and "already holds a heat map; pass --overwrite" in stderr
    assert (tmp_path / "heatmap.json").read_bytes() == before
    code, _, stderr = main(["heatmap", *flags, "--overwrite", "--device", "cpu", "--batch-size", 32], capsys)
    assert code == 0 and "warning: --device is deprecated, use --accelerator" in stderr
    assert "warning: --batch-size is deprecated, use --images-per-pass" in stderr.splitlines()
    np.testing.assert_array_equal(np.load(tmp_path / "heatmap.npy"), heat)  # same samples, same seed
    if not torch.cuda.is_available():
        code, _, stderr = main(["heatmap", *flags, "--overwrite", "--accelerator", "gpu"], capsys)
        assert code == 2 and "CUDA is not available" in stderr


def test_a_flag_shown_in_two_subcommands_means_one_thing():
    """Each flag a subcommand's help shows stores into one destination in every subcommand (heatmap's images per
    forward pass are `--images-per-pass`, not map2d's old `--batch-size`, an alias of `--chunk-rows`)."""
    commands = frequency_analysis.build_parser()._subparsers._group_actions[0].choices
    dests: dict[str, set[str]] = {}
    for sub in commands.values():
        for action in sub._actions:
            for flag in action.option_strings if action.help != argparse.SUPPRESS else ():
                dests.setdefault(flag, set()).add(action.dest)
    assert {flag: d for flag, d in dests.items() if len(d) > 1} == {}
    assert "--batch-size" not in dests and dests["--images-per-pass"] == {"images_per_pass"}


def test_default_folders_are_named_after_command_model_dataset_and_run(trained, tmp_path, monkeypatch, capsys):
    """outputs/frequency_analysis/<command>/<model>_<dataset>[_<kind>]_<run> under the working directory."""
    monkeypatch.chdir(tmp_path)
    run = f"{trained.ckpt.parent.name}-{trained.ckpt.stem}"
    flags = ["--checkpoint", trained.ckpt, "--num-samples", 2, "--max-iter", 3, "--no-progress"]
    root = tmp_path / "outputs" / "frequency_analysis"
    assert main(["map2d", *flags], capsys)[0] == 0
    assert files(root / "map2d" / f"lenet_synthetic_grid_{run}") == STANDARD | {"map2d.npy", "map2d.png"}
    assert main(["random", *flags, "--count", "2"], capsys)[0] == 0
    folder = root / "random" / f"lenet_synthetic_{run}"
    assert files(folder) == {"dct_vs_random.png", "analysis.json"} and files(folder / "random") >= STANDARD
    assert main(["heatmap", *flags[:4], "--eps", 1], capsys)[0] == 0
    assert files(root / "heatmap" / f"lenet_synthetic_{run}") == {"heatmap.npy", "heatmap.json", "heatmap.png"}
    assert {p.name for p in tmp_path.iterdir()} == {"outputs"}


def test_bad_input_is_one_line_and_writes_nothing(trained, tmp_path, capsys):
    cases = {
        "block too large": (
            ["map2d", "--subspace-dim", 17],
            "subspace_dim=17 (--subspace-dim) does not fit the 16x16 images",
        ),
        "no random subspaces": (["random", "--count", 0], "number of random subspaces must be >= 1"),
        "missing bases": (["random", "--bases", tmp_path / "nope.npy"], "does not exist"),
        "bad threads": (["map2d", "--threads", 0], "threads must be >= 1 (--threads), got 0"),
    }
    for name, (argv, pattern) in cases.items():
        out = tmp_path / name.replace(" ", "_")
        code, stdout, stderr = main([*argv[:1], *common(trained), *argv[1:], "--output-dir", out], capsys)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], (name, lines)
        assert not out.exists(), name  # checked before anything is measured (random: before the DCT family)
