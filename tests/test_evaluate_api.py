"""`margins.run.evaluate.evaluate_margins` from Python: any model and dataset, float64, the returned report, the
engine's kernels, the subspace vocabulary, and the errors a library caller sees.

Independent reference: the engine called directly on each chunk of rows with only that chunk's samples.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import signal

import numpy as np
import pytest
import torch
from torch import nn

from attacks.deepfool import ENGINE_VERSION, SubspaceDeepFool
from common.errors import InputError
from frequency import DCTBlockSubspaces, DCTGridSubspaces, FullSpace
from frequency.random_subspaces import RandomSubspaces
from margins.inputs import describe_family
from margins.run.evaluate import evaluate_margins
from margins.run.work import chunk_ranges, row_grid
from margins.settings import DEFAULT_CHUNK_ROWS, AttackSettings, RowSettings, RunSettings, default_threads
from margins.store.results import read_report
from models import build_model

RUN = RunSettings(accelerator="cpu", devices=1, progress=False, threads=1)  # bits as the test process's engine


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 5)).eval()


def _reference(model, x, family, chunk, dtype, max_iter, kernels="auto"):
    model = model.to(dtype)
    attack = SubspaceDeepFool(max_iter=max_iter, batch_size=chunk, kernels=kernels)
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
        run=RUN,
    )
    assert folder == tmp_path / "out" and report.margins.shape == (len(family), 4)
    ref = _reference(_model(), x[[6, 0, 3, 2]], family, 5, torch.float64, 20)
    np.testing.assert_array_equal(report.margins, ref.astype(np.float32))  # float64 attack, stored as float32
    ref32 = _reference(_model(), x[[6, 0, 3, 2]], family, 5, torch.float32, 20)
    assert not np.array_equal(ref.astype(np.float32), ref32)  # the dtype really changed the computation
    assert signal.getsignal(signal.SIGTERM) is before  # the run's SIGTERM handler is gone
    back = read_report(folder)
    assert back.settings["dtype"] == "float64" and back.settings["cpu_threads"] == 1
    assert back.settings["source"] == "evaluate_margins" and back.settings["model"] == "Sequential"
    np.testing.assert_array_equal(back.targets, [6 % 5, 0, 3, 2])
    np.testing.assert_array_equal(back.margins, report.margins)
    assert back.settings == json.loads(json.dumps(report.settings))  # what was returned is what was written


def test_kernels_are_passed_to_the_engine_and_part_of_the_fingerprint(tmp_path):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 5)).eval()
    x = torch.rand(4, 2, 8, 8, generator=torch.Generator().manual_seed(4))
    family = DCTBlockSubspaces((2, 8, 8), 4, 4)
    common = {"model": model, "dataset": [(x[i], 0) for i in range(4)], "subspaces": family, "indices": np.arange(4)}
    results = {}
    for kernels in ("off", "auto"):
        attack = AttackSettings(max_iter=20, chunk_rows=8, kernels=kernels)
        report, folder = evaluate_margins(**common, output_dir=tmp_path / kernels, attack=attack, run=RUN)
        np.testing.assert_array_equal(report.margins, _reference(model, x, family, 8, torch.float32, 20, kernels))
        assert report.settings["kernels"] == kernels
        results[kernels] = report.margins
    assert not np.array_equal(results["off"], results["auto"])  # the kernels move float rounding: they ran
    (folder / "summary.json").unlink()  # an unfinished folder: a resume with other settings must be refused
    off = AttackSettings(max_iter=20, chunk_rows=8, kernels="off")
    with pytest.raises(InputError, match='kernels: "auto" there, "off" now'):
        evaluate_margins(**common, output_dir=folder, attack=off, run=RUN)
    with pytest.raises(InputError, match="kernels must be 'auto' or 'off'"):
        evaluate_margins(**common, output_dir=tmp_path / "bad", attack=AttackSettings(kernels="fast"), run=RUN)
    assert not (tmp_path / "bad").exists()


def _full_space_run(x: torch.Tensor, out, attack: AttackSettings, run: RunSettings):
    """The margins of `_model()` on the two images `x` [2, 1, 8, 8] (labels 0, 1) in the full space."""
    report, _ = evaluate_margins(
        rows=RowSettings(num_samples=2),
        model=_model(),
        dataset=[(x[i], i) for i in range(2)],
        subspaces=FullSpace((1, 8, 8)),
        output_dir=out,
        attack=attack,
        run=run,
    )
    return report


def test_settings_are_frozen_and_the_callers_objects_stay_as_passed(tmp_path):
    """The chunk size a run chooses (None: the default) goes into the job's copy, never into the caller's object."""
    attack, run = AttackSettings(max_iter=3), RunSettings(accelerator="cpu", devices=1, progress=False)
    passed = copy.deepcopy((attack, run))
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    report = _full_space_run(x, tmp_path / "out", attack, run)
    assert (attack, run) == passed and attack.chunk_rows is None and run.threads is None
    assert report.settings["chunk_rows"] == DEFAULT_CHUNK_ROWS
    assert report.settings["cpu_threads"] == default_threads(1)  # None: the cores this process may use
    for settings, field in ((attack, "chunk_rows"), (run, "threads")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(settings, field, 2)
    assert dataclasses.replace(attack, chunk_rows=8).chunk_rows == 8 and attack.chunk_rows is None


def test_default_threads_share_the_usable_cores_among_a_nodes_processes(monkeypatch, tmp_path):
    """`RunSettings.threads` None: the cores this process may use (its affinity) divided by the processes on the
    node, at least 1; an explicit count is kept; the run's count is recorded and the caller's thread count restored."""
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))
    assert [default_threads(n) for n in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert RunSettings().resolved(processes_per_node=2).threads == 4
    assert RunSettings(threads=3).resolved(processes_per_node=2).threads == 3
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1, 2})
    before = torch.get_num_threads()
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    report = _full_space_run(
        x, tmp_path / "out", AttackSettings(max_iter=3), RunSettings(accelerator="cpu", devices=1, progress=False)
    )
    assert report.settings["cpu_threads"] == 3 and torch.get_num_threads() == before


def test_chunks_of_another_engine_version_are_not_resumed(tmp_path):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    common = {
        "model": _model(),
        "dataset": [(x[i], 0) for i in range(3)],
        "subspaces": DCTBlockSubspaces((1, 8, 8), 4, 4),
        "indices": np.arange(3),
        "attack": AttackSettings(max_iter=5, chunk_rows=4),
        "run": RUN,
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


def test_a_finished_folder_is_kept_unless_overwrite_and_the_error_names_the_library_parameter(tmp_path):
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    common = {
        "model": _model(),
        "dataset": [(x[i], i) for i in range(3)],
        "subspaces": FullSpace((1, 8, 8)),
        "indices": np.arange(3),
        "output_dir": tmp_path / "out",
    }
    first, folder = evaluate_margins(**common, attack=AttackSettings(max_iter=5), run=RUN)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(InputError) as info:
        evaluate_margins(**common, attack=AttackSettings(max_iter=6), run=RUN)
    message = str(info.value)
    assert "already holds a finished evaluation" in message and "overwrite=True" in message
    assert str(folder.resolve()) in message
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before  # nothing touched
    again = RunSettings(accelerator="cpu", devices=1, progress=False, overwrite=True)
    second, _ = evaluate_margins(**common, attack=AttackSettings(max_iter=6), run=again)
    assert read_report(folder).settings["max_iter"] == 6 and second.settings["max_iter"] == 6
    assert first.settings["max_iter"] == 5


def test_missing_arguments_and_bad_settings_name_the_parameter(tmp_path):
    dataset = [(torch.rand(1, 8, 8), 0)]
    with pytest.raises(InputError, match="pass model, output_dir"):
        evaluate_margins(dataset=dataset)
    for attack, pattern in (
        (AttackSettings(max_iter=0), "max_iter must be >= 1"),
        (AttackSettings(chunk_rows=0), "chunk_rows must be >= 1"),
        (AttackSettings(dtype="float16"), "dtype must be one of float32, float64"),
        (AttackSettings(overshoot=-1.0), "overshoot must be"),
    ):
        with pytest.raises(InputError, match=pattern):
            evaluate_margins(model=_model(), dataset=dataset, output_dir=tmp_path / "x", attack=attack, run=RUN)
    assert not (tmp_path / "x").exists()


@pytest.fixture
def lenet_checkpoint(tmp_path, tiny_mnist_root):
    """A Lightning-style checkpoint dict of an untrained LeNet with its datamodule's hyperparameters (tiny MNIST)."""
    torch.manual_seed(0)
    checkpoint = {
        "state_dict": {f"model.net.{k}": v for k, v in build_model("lenet").state_dict().items()},
        "hyper_parameters": {"net": "lenet", "num_classes": 10, "image_shape": (1, 28, 28)},
        "datamodule_hyper_parameters": {"dataset": "mnist", "data_dir": str(tiny_mnist_root), "transform": "none"},
    }
    torch.save(checkpoint, tmp_path / "run.ckpt")
    return tmp_path / "run.ckpt"


@pytest.mark.parametrize(
    "kind,dim,step,expected",
    [
        ("dct", None, 20, DCTBlockSubspaces((1, 28, 28), 8, 20)),  # the dataset's block side
        ("grid", 14, None, DCTGridSubspaces((1, 28, 28), 14, 7)),  # a grid's default stride: k // 2
        ("random", 8, 20, RandomSubspaces((1, 28, 28), 64, 2, seed=0)),  # as many as the DCT blocks, same dim
        ("full", None, None, FullSpace((1, 28, 28))),
    ],
)
def test_subspace_kinds_from_a_checkpoint_are_recorded(lenet_checkpoint, tmp_path, kind, dim, step, expected):
    """`subspace=` names a family resolved against the checkpoint's dataset; the folder records it (describe_family:
    equal families, equal digests) and its default name carries the kind."""
    report, folder = evaluate_margins(
        lenet_checkpoint,
        rows=RowSettings(subspace=kind, subspace_dim=dim, subspace_step=step, num_samples=2),
        attack=AttackSettings(max_iter=3),
        run=RUN,
        output_root=str(tmp_path / "outputs"),
    )
    suffix = "" if kind == "dct" else f"_{kind}"
    assert folder == tmp_path / "outputs" / f"lenet_mnist{suffix}_{tmp_path.name}-run"
    described = describe_family(expected)
    assert {k: report.settings[k] for k in described} == json.loads(json.dumps(described))
    assert report.margins.shape == (len(expected), 2)
    assert (folder / "margins.png").is_file() == (kind != "grid")  # a grid gets its 2-D map instead
    with pytest.raises(InputError, match="unknown subspace kind 'wavelet'"):
        evaluate_margins(lenet_checkpoint, rows=RowSettings(subspace="wavelet"), output_dir=tmp_path / "w", run=RUN)


def test_state_digest_covers_every_tensor_including_0_d_buffers(tmp_path):
    """state_sha256 (the fingerprint of an in-memory model, and of the callback's weights): batch norm's 0-d
    `num_batches_tracked` hashes like any tensor; equal states, equal digests; any changed byte, another digest.
    Reference: hashlib over the names and numpy bytes of the state, written here."""
    import hashlib

    from margins.run.evaluate import state_sha256

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 36, 3)).eval()
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())
    assert state_sha256(model) == digest.hexdigest()
    twin = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 36, 3))
    twin.load_state_dict(model.state_dict())
    assert state_sha256(twin) == state_sha256(model)
    twin[1].num_batches_tracked += 1
    assert state_sha256(twin) != state_sha256(model)
    x = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(7))
    report, _ = evaluate_margins(
        rows=RowSettings(num_samples=2),
        model=model,
        dataset=[(x[i], i) for i in range(2)],
        output_dir=tmp_path / "bn",
        attack=AttackSettings(max_iter=5),
        run=RUN,
    )
    assert report.settings["checkpoint_sha256"] == digest.hexdigest() and report.margins.shape == (1, 2)
