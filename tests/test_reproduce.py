"""scripts/reproduce.py: cluster jobs (sbatch array, torchrun lines) and end-to-end runs on small generated data in
CIFAR-10's on-disk layout and in ImageNet's image-folder layout, each writing its results page to a temp dir."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets.cifar as tv_cifar
from PIL import Image

from configs import config_path
from scripts import reproduce
from scripts.results_doc import CLAIMS

DOCS = Path(__file__).resolve().parents[1] / "docs"
TINY_TRAINING = "--trainer.max_steps 2 --trainer.limit_val_batches 1 --trainer.num_sanity_val_steps 0"


def write_cifar10(root: Path, per_batch: int = 20, seed: int = 0) -> Path:
    """torchvision's `cifar-10-batches-py` pickles (data_batch_1..5, test_batch, batches.meta), `per_batch` images
    each: noise with a bright band whose row encodes the label."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]:
        labels = np.arange(per_batch) % 10
        images = rng.integers(0, 60, size=(per_batch, 3, 32, 32), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, :, 3 * label : 3 * label + 4, :] = 230
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images.reshape(per_batch, -1), "labels": labels.tolist()}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return root


def write_image_folder(root: Path, classes: int = 2, per_class: int = 3, size: int = 40) -> Path:
    """ImageNet's layout `<root>/{train,val}/<class>/*.png` with generated images (one colour per class)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            (root / split / f"n{c:08d}").mkdir(parents=True)
            for k in range(per_class):
                image = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
                image[..., c % 3] += 150
                Image.fromarray(image).save(root / split / f"n{c:08d}" / f"img{k}.png")
    return root


def docs_state() -> dict[str, float]:
    return {p.name: p.stat().st_mtime for p in DOCS.iterdir()}


def test_sbatch_array_has_one_task_per_experiment(tmp_path):
    out = tmp_path / "runs"
    given = tmp_path / "release_lowpass_vgg19.t7"
    argv = ["--dataset", "cifar10", "--data-dir", str(tmp_path / "data"), "--out", str(out), "--emit", "sbatch",
            "--gpus", "4", "--only", "cifar10_resnet18", "cifar10_flipped_resnet18", "cifar10_lowpass_vgg19",
            "--checkpoint", f"cifar10_lowpass_vgg19={given}"]  # fmt: skip
    assert reproduce.main(argv) == {}
    script = (out / "jobs" / "cifar10.sbatch").read_text()
    assert "#SBATCH --array=0-2" in script and "#SBATCH --gres=gpu:4" in script and "#SBATCH --requeue" in script
    tasks = script.split('case "$SLURM_ARRAY_TASK_ID" in')[1].split(";;")[:-1]
    assert len(tasks) == 3
    for task, name in zip(tasks, ["cifar10_resnet18", "cifar10_flipped_resnet18", "cifar10_lowpass_vgg19"]):
        assert f"--output-dir {out / 'margins' / name}" in task
        if name == "cifar10_lowpass_vgg19":  # given: measured only, with the experiment's model and transform
            assert " -m train " not in task and f"--checkpoint {given}" in task and "--transform low_pass" in task
        else:  # trained (resuming after a requeue), then measured on its last.ckpt
            assert f"-m train fit --config {config_path(name)}" in task and "--trainer.strategy ddp" in task
            assert f"--checkpoint {out / 'logs' / name / 'reproduce' / 'checkpoints' / 'last.ckpt'}" in task
            assert 'RESUME=(--ckpt_path "$CKPT")' in task
    assert "--overwrite" not in script  # a requeued task resumes its committed chunks
    assert subprocess.run(["bash", "-n", str(out / "jobs" / "cifar10.sbatch")]).returncode == 0


def test_torchrun_lines_train_and_measure_every_imagenet_experiment(tmp_path):
    argv = ["--dataset", "imagenet", "--out", str(tmp_path), "--emit", "torchrun", "--gpus", "8"]
    reproduce.main(argv)
    lines = (tmp_path / "jobs" / "imagenet_torchrun.sh").read_text().splitlines()
    launches = [line for line in lines if "torch.distributed.run --standalone --nproc-per-node 8" in line]
    experiments = [e.name for e in reproduce.experiments("imagenet")]
    assert len(launches) == 2 * len(experiments)
    for name in experiments:
        assert sum(f"margins/{name} " in line for line in launches) == 1
        assert sum(f"configs/{name}.yaml" in line for line in launches) == 1


def test_bad_experiment_names_are_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit):
        reproduce.main(["--dataset", "mnist", "--only", "cifar10_resnet18", "--emit", "sbatch"])
    assert "choose from mnist_lenet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reproduce.main(["--dataset", "imagenet", "--checkpoint", "model.pt", "--emit", "sbatch"])
    assert "EXPERIMENT=PATH" in capsys.readouterr().err


def test_cifar10_layout_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    data, out, before = write_cifar10(tmp_path / "data"), tmp_path / "out", docs_state()
    common = ["--dataset", "cifar10", "--data-dir", str(data), "--out", str(out), "--in-process", "--num-samples",
              "2", f"--train-args={TINY_TRAINING} --data.batch_size 8", "--margin-args=--max-iter 2"]  # fmt: skip
    summary = reproduce.main([*common, "--only", "cifar10_resnet18", "cifar10_flipped_resnet18"])
    results = summary["results"]
    assert list(results) == ["cifar10_resnet18", "cifar10_flipped_resnet18"]
    for r in results.values():
        assert len(r["median_margin"]) == 13 and r["margin_samples"] == 2 and r["trained_by"] == "this run"
        assert Path(r["checkpoint"]).is_file()
    standard = results["cifar10_resnet18"]
    expected = standard["high_band_median"] / standard["low_band_median"]
    assert summary["claims"]["standard_high_over_low_resnet18"] == pytest.approx(expected)
    page = (out / "RESULTS-cifar10.md").read_text()
    assert CLAIMS["cifar10"][0].text in page and f"{expected:.2f}x" in page
    assert (out / "cifar10_margins.png").is_file() and docs_state() == before  # nothing written to docs/
    assert reproduce.figure(results, tmp_path / "panels.png") == len(results)  # one axes per panel, none blank

    # a given checkpoint is measured, not trained: the standard model's as "robust" has its margins exactly
    ckpt = standard["checkpoint"]
    again = reproduce.main([*common, "--only", "cifar10_resnet18", "cifar10_robust_resnet18", "--checkpoint",
                            f"cifar10_robust_resnet18={ckpt}"])  # fmt: skip
    robust = again["results"]["cifar10_robust_resnet18"]
    assert robust["trained_by"] == "given checkpoint" and robust["median_margin"] == standard["median_margin"]
    assert again["claims"]["robust_over_standard_low_resnet18"] == 1.0
    assert again["results"]["cifar10_resnet18"]["median_margin"] == standard["median_margin"]  # resumed, not retrained


def test_imagenet_folder_end_to_end_and_collect(tmp_path):
    data, out = write_image_folder(tmp_path / "data"), tmp_path / "out"
    common = ["--dataset", "imagenet", "--data-dir", str(data), "--out", str(out), "--num-samples", "2"]
    data_args = "--data.batch_size 2 --data.num_workers 0 --data.image_size 32 --data.resize 36"
    train = f"--train-args={TINY_TRAINING} {data_args}"
    margin = "--margin-args=--max-iter 2 --subspace-dim 16 --subspace-step 16"
    summary = reproduce.main([*common, "--in-process", train, margin, "--only", "imagenet_flipped_resnet50"])
    (result,) = summary["results"].values()
    assert len(result["median_margin"]) == 2 and result["transform"] == "flip"
    assert "16x16 blocks, step 16, of 3x32x32 images" in result["subspaces"]
    page = (out / "RESULTS-imagenet.md").read_text()
    assert "imagenet_flipped_resnet50" in page and "Not checked in this run" in page
    collected = reproduce.main([*common, "--collect"])  # the page again, from the result folders alone
    assert collected["results"]["imagenet_flipped_resnet50"]["median_margin"] == result["median_margin"]
    assert list(collected["results"]) == ["imagenet_flipped_resnet50"]  # the others were never measured
    assert json.loads((out / "summary.json").read_text())["results"].keys() == collected["results"].keys()
