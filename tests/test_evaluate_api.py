"""`margins.evaluate.evaluate_margins` from Python: any model and dataset, float64, the returned report.

Independent reference: the engine called directly on each chunk of rows with only that chunk's samples.
"""

from __future__ import annotations

import signal

import numpy as np
import pytest
import torch
from torch import nn

from attacks.deepfool import SubspaceDeepFool
from common.errors import InputError
from frequency import DCTBlockSubspaces
from margins.evaluate import AttackSettings, RunSettings, evaluate_margins, single_process_device
from margins.results import read_report
from margins.sharding import chunk_ranges, row_grid


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 5)).eval()


def _reference(x, family, chunk, dtype, max_iter):
    model = _model().to(dtype)
    attack = SubspaceDeepFool(max_iter=max_iter, batch_size=chunk)
    n, s = x.shape[0], len(family)
    margins = np.zeros(n * s)
    for rows in chunk_ranges(n * s, chunk):
        samples, subs = row_grid(n, s, rows)
        used = sorted(set(samples))
        local = torch.tensor([used.index(k) for k in samples])
        margins[rows.start : rows.stop] = attack.attack_rows(
            model, x[used].to(dtype), family, local, torch.tensor(subs)
        ).margins.numpy()
    return margins.reshape(n, s).T


def test_python_call_with_a_model_and_a_dataset_in_float64(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    x = torch.rand(7, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    dataset = [(x[i], i % 5) for i in range(7)]
    family = DCTBlockSubspaces((1, 8, 8), 4, 2)
    report, folder = evaluate_margins(
        model=_model(),
        dataset=dataset,
        subspaces=family,
        indices=np.array([6, 0, 3, 2]),
        output_dir=tmp_path / "out",
        attack=AttackSettings(max_iter=20, chunk_rows=5, dtype="float64"),
        run=RunSettings(accelerator="cpu", devices=1, progress=False),
    )
    assert folder == tmp_path / "out" and report.margins.shape == (len(family), 4)
    ref = _reference(x[[6, 0, 3, 2]], family, 5, torch.float64, 20)
    np.testing.assert_array_equal(report.margins, ref.astype(np.float32))  # float64 attack, stored as float32
    ref32 = _reference(x[[6, 0, 3, 2]], family, 5, torch.float32, 20)
    assert not np.array_equal(ref.astype(np.float32), ref32)  # the dtype really changed the computation
    assert signal.getsignal(signal.SIGTERM) is before  # the run's SIGTERM handler is gone
    back = read_report(folder)
    assert back.settings["dtype"] == "float64" and back.settings["cpu_threads"] == 1
    np.testing.assert_array_equal(back.targets, [6 % 5, 0, 3, 2])
    np.testing.assert_array_equal(back.margins, report.margins)


@pytest.mark.parametrize(
    "run,env,expected",
    [
        (RunSettings(), {}, "cpu"),
        (RunSettings(accelerator="cpu", devices=1, num_nodes=1), {}, "cpu"),
        (RunSettings(accelerator="cpu", devices=2), {}, None),
        (RunSettings(accelerator="cpu", num_nodes=2), {}, None),
        (RunSettings(accelerator="cpu", strategy="single_device"), {}, None),
        (RunSettings(accelerator="cpu"), {"TORCHELASTIC_RUN_ID": "x"}, None),
        (RunSettings(accelerator="cpu"), {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "margins"}, None),
        (RunSettings(accelerator="cpu"), {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "bash"}, "cpu"),
        (RunSettings(accelerator="cpu"), {"OMPI_COMM_WORLD_SIZE": "2"}, None),
    ],
)
def test_single_process_runs_without_lightning_only_when_alone(monkeypatch, run, env, expected):
    """One process, strategy auto and no launcher: this process runs the chunks; else Lightning (None)."""
    for name in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_JOB_NAME", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if (
        expected == "cpu"
        and run.accelerator == "auto"
        and (torch.cuda.is_available() or torch.backends.mps.is_available())
    ):
        pytest.skip("auto picks an accelerator here")
    device = single_process_device(run)
    assert (device.type if device is not None else None) == expected


def test_channels_last_is_passed_to_the_engine_and_part_of_the_fingerprint(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    x = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    family = DCTBlockSubspaces((2, 8, 8), 4, 4)
    common = {"model": model, "dataset": [(x[i], 0) for i in range(4)], "subspaces": family, "indices": np.arange(4)}
    run = RunSettings(accelerator="cpu", devices=1, progress=False)
    attack = AttackSettings(max_iter=20, chunk_rows=8, dtype="float64", channels_last=True)
    report, folder = evaluate_margins(**common, output_dir=tmp_path / "cl", attack=attack, run=run)
    engine = SubspaceDeepFool(max_iter=20, batch_size=8, channels_last=True, dtype=torch.float64)(model, x, family)
    np.testing.assert_array_equal(report.margins, engine.margins.numpy().astype(np.float32))
    assert report.settings["channels_last"] is True
    (folder / "summary.json").unlink()  # an unfinished folder: a resume with other settings must be refused
    other = AttackSettings(max_iter=20, chunk_rows=8, dtype="float64", channels_last=False)
    with pytest.raises(InputError, match="channels_last"):
        evaluate_margins(**common, output_dir=folder, attack=other, run=run)


def test_chunks_of_another_engine_version_are_not_resumed(tmp_path):
    import json

    from attacks.deepfool import ENGINE_VERSION

    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    common = {
        "model": _model(),
        "dataset": [(x[i], 0) for i in range(3)],
        "subspaces": DCTBlockSubspaces((1, 8, 8), 4, 4),
        "indices": np.arange(3),
        "attack": AttackSettings(max_iter=5, chunk_rows=4),
        "run": RunSettings(accelerator="cpu", devices=1, progress=False),
    }
    report, folder = evaluate_margins(**common, output_dir=tmp_path / "out")
    assert report.settings["engine_version"] == ENGINE_VERSION
    (folder / "summary.json").unlink()  # unfinished, as if interrupted, with chunks from an older engine
    manifest_path = folder / "chunks" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["fingerprint"]["engine_version"] = ENGINE_VERSION - 1
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=f"engine_version: {ENGINE_VERSION - 1} there, {ENGINE_VERSION} now"):
        evaluate_margins(**common, output_dir=folder)
