"""Train and evaluate with LightningCLI.

    python train.py fit --config configs/mnist_lenet.yaml [--trainer.max_epochs 3] [--data.data_dir ...]
    python train.py test --config configs/mnist_lenet.yaml --ckpt_path path/to/last.ckpt
    python train.py fit --config configs/cifar10_resnet18.yaml --trainer.strategy ddp --trainer.devices 4

The model's `num_classes` and `image_shape` are linked from the datamodule, so a config names only the
network; checkpoints keep both the model's and the datamodule's hyperparameters (dataset, transform).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import lightning as L
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from callbacks import MarginCallback
from callbacks.margin import terminal_print
from common.errors import InputError
from datamodules import FrequencyDataModule
from lightning_modules import ClassifierModule

ROOT_DIR = "${trainer.default_root_dir}"  # logger save_dir placeholder, replaced by the run's default_root_dir


class RunFolder(L.Callback):
    """The version folder this process reserved, and whether a stage ever started in it: a run that fails before
    (a missing data directory, a bad setting) leaves no empty folder for TensorBoard to list (`remove_if_unused`)."""

    reserved: Path | None = None
    started = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        RunFolder.started = True

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    @classmethod
    def remove_if_unused(cls) -> None:
        if cls.reserved is not None and not cls.started and not any(cls.reserved.rglob("*.ckpt")):
            shutil.rmtree(cls.reserved, ignore_errors=True)


class RunSummary(L.Callback):
    """Rank 0, when `fit` or `test` ends: where the run's outputs are (run folder, checkpoints, tested weights)."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            terminal_print(run_folder_lines(trainer) + checkpoint_lines(trainer))

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            tested = trainer.ckpt_path or "the configured model (no --ckpt_path)"
            terminal_print([*run_folder_lines(trainer), f"tested weights:  {tested}"])


def run_folder_lines(trainer: L.Trainer) -> list[str]:
    """ "run folder: <log dir>" and, with a TensorBoard logger, the command that shows it. Rank 0 alone calls
    this: the folder is read from the first logger as `Trainer.log_dir` does, without its broadcast."""
    logger = trainer.loggers[0] if trainer.loggers else None
    folder = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None) or trainer.default_root_dir
    lines = [f"run folder:      {folder}"]
    board = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
    if board is not None:
        lines.append(f"TensorBoard:     tensorboard --logdir {board.save_dir}")
    return lines


def checkpoint_lines(trainer: L.Trainer) -> list[str]:
    """The best checkpoint (with its monitored score, or the latest one without a monitor) and `last.ckpt`."""
    callback = trainer.checkpoint_callback
    if callback is None:
        return ["checkpoints:     none (checkpointing off)"]
    lines = []
    if callback.best_model_path:
        score = callback.best_model_score
        note = (
            f"{callback.monitor} {float(score):.4g}" if callback.monitor and score is not None else "latest; no monitor"
        )
        lines.append(f"best checkpoint: {callback.best_model_path} ({note})")
    if callback.last_model_path:
        lines.append(f"last checkpoint: {callback.last_model_path}")
    return lines or ["checkpoints:     none saved"]


def reserve_version(folder: Path) -> int:
    """Create `folder/version_N` for the first free N above the existing ones; mkdir is atomic, so concurrent
    runs never share a version."""
    folder.mkdir(parents=True, exist_ok=True)
    taken = [p.name.removeprefix("version_") for p in folder.glob("version_*")]
    version = max((int(v) + 1 for v in taken if v.isdigit()), default=0)
    while True:
        try:
            (folder / f"version_{version}").mkdir()
            return version
        except FileExistsError:
            version += 1


class HoldMeTightCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(MarginCallback, "margin")  # `margin:` section, `--margin.num_samples 20`
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.image_shape", "model.init_args.image_shape", apply_on="instantiate")
        logger = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"save_dir": ROOT_DIR}}
        parser.set_defaults({"trainer.default_root_dir": "logs", "trainer.logger": logger})

    def before_instantiate_classes(self) -> None:
        """Outputs follow `--trainer.default_root_dir` (default `logs`): the logger writes to
        `<root>/<name>/version_N/` (checkpoints in its `checkpoints/`); N is reserved atomically on rank 0."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        logger = config.trainer.logger
        init = getattr(logger, "init_args", None)
        if init is None or not isinstance(init.get("save_dir"), str):
            return
        init.save_dir = init.save_dir.replace(ROOT_DIR, str(config.trainer.default_root_dir))
        versioned = logger.class_path.endswith(("TensorBoardLogger", "CSVLogger")) and init.get("version") is None
        if self.subcommand and versioned and rank_zero_only.rank == 0:
            folder = Path(init.save_dir, init.get("name") or "").expanduser()
            init.version = reserve_version(folder)
            RunFolder.reserved = folder / f"version_{init.version}"


def main(args: list[str] | None = None, run: bool = True) -> HoldMeTightCLI:
    """Parse `args` (default: sys.argv) and run the subcommand; `run=False` only instantiates (no subcommand)."""
    return HoldMeTightCLI(
        ClassifierModule,
        FrequencyDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"allow_abbrev": False},  # `--margin.num_sample` is a typo, not `num_samples`
        trainer_defaults={"callbacks": [RunFolder(), RunSummary()]},
        args=args,
        run=run,
    )


def cli() -> int:
    """`python train.py ...`: this project's input errors (e.g. a resume contradicting the checkpoint's schedule)
    become one line `error: ...` with exit status 2; anything else keeps its traceback."""
    try:
        main()
    except InputError as err:
        RunFolder.remove_if_unused()
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    except BaseException:
        RunFolder.remove_if_unused()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(cli())
