"""Bad settings name the Python parameter and the command-line flag alike; each command's messages name its own
flags; a pickle that needs trust is said to need it."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import compare_margins
import evaluate_margin
import frequency_analysis
from common.errors import InputError
from margins.settings import RowSettings
from models import build_model
from models.checkpoint import CheckpointReadError, read_checkpoint
from models.loading import UntrustedCheckpointError, untrusted_pickle_error

TOY = SimpleNamespace(image_shape=(1, 8, 8), subspace_block=4, subspace_step=1, name="toy")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: RowSettings(num_samples=5).indices(2, "toy"), r"num_samples=5 (--num-samples) is not in [1, 2]"),
        (lambda: RowSettings(num_samples=0).check(), "num_samples must be >= 1 (--num-samples), got 0"),
        (lambda: RowSettings(seed=-1).check(), "seed must be >= 0 (--seed), got -1"),
        (lambda: RowSettings(subspace_dim=9).family(TOY), "subspace_dim=9 (--subspace-dim) does not fit"),
        (lambda: RowSettings(subspace_step=0).family(TOY), "subspace_step=0 (--subspace-step) must be >= 1"),
        (lambda: RowSettings(subspace="random", count=0).family(TOY), "count=0 (--count)"),
        (
            lambda: RowSettings(subspace="full", subspace_dim=2).family(TOY),
            "subspace_dim/subspace_step (--subspace-dim/",
        ),
        (lambda: RowSettings(subspace="wavelet").family(TOY), "'wavelet' for subspace (--subspace)"),
        (lambda: RowSettings(subspace="random", method="x").check(), "method must be one of auto, qr, hartley"),
    ],
)
def test_errors_name_parameter_and_flag(call, message):
    with pytest.raises(InputError) as error:
        call()
    assert message in str(error.value)


# ---- checkpoints that need trust, data that is missing: each command's message names that command's flags ----------
class _Payload:
    """Unpickling it would create the folder `path`: a stand-in for a malicious pickle."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return os.mkdir, (str(self.path),)


def test_a_pickle_that_needs_trust_is_refused_as_such_naming_the_flag_and_never_run(tmp_path):
    """A file whose pickle calls a function (here os.mkdir): refused, said to need trust (not to be corrupt), the
    flag named; nothing of it ran. A damaged file is still called damaged."""
    ran = tmp_path / "ran"
    torch.save({"state_dict": _Payload(ran)}, tmp_path / "payload.ckpt")
    with pytest.raises(UntrustedCheckpointError) as error:
        read_checkpoint(tmp_path / "payload.ckpt")
    message = str(error.value)
    assert "--trusted-pickle" in message and "trust" in message and "corrupt" not in message, message
    assert "\n" not in message and not ran.exists()
    assert "--ckpt_trusted" in untrusted_pickle_error(tmp_path / "payload.ckpt", "--ckpt_trusted").args[0]
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "payload.ckpt").read_bytes()[:-40])
    with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.ckpt")


@pytest.fixture
def lenet_t7(tmp_path) -> Path:
    torch.save(build_model("lenet").state_dict(), tmp_path / "lenet.t7")
    return tmp_path / "lenet.t7"


@pytest.mark.parametrize("command", ["evaluate_margin.py", "map2d", "random", "heatmap"])
def test_missing_data_names_the_commands_own_flag(command, lenet_t7, tmp_path, capsys):
    """MNIST absent: one line naming --data-dir (this command's flag), none of train.py's (--data.download,
    --data.data_dir), and the command itself where it says that it never downloads."""
    flags = ["--model", "lenet", "--dataset", "mnist", "--checkpoint", str(lenet_t7), "--data-dir",
             str(tmp_path / "nowhere"), "--output-dir", str(tmp_path / "out")]  # fmt: skip
    if command == "evaluate_margin.py":
        code = evaluate_margin.main(flags)
    else:
        code = frequency_analysis.main([command, *flags, *(["--eps", "1"] if command == "heatmap" else [])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: MNIST not found"), err
    assert "--data-dir" in err and "--data." not in err, err
    name = "evaluate_margin.py" if command == "evaluate_margin.py" else "frequency_analysis.py"
    assert f"{name} never downloads" in err and not (tmp_path / "out").exists()


def test_compare_margins_names_its_own_flags(tmp_path, capsys):
    (tmp_path / "unfinished").mkdir()
    code = compare_margins.main([str(tmp_path / "unfinished"), str(tmp_path / "unfinished")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot read margin results in") and "--" not in err
    code = compare_margins.main(["--export-csv", str(tmp_path / "a"), str(tmp_path / "b"), "--output", "x.csv"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--output takes one RUN_DIR" in err
