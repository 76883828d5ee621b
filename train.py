"""Train and evaluate with LightningCLI.

    python train.py fit --config configs/mnist_lenet.yaml [--trainer.max_epochs 3] [--data.data_dir ...]
    python train.py test --config configs/mnist_lenet.yaml --ckpt_path path/to/last.ckpt
    python train.py fit --config configs/cifar10_resnet18.yaml --trainer.strategy ddp --trainer.devices 4

The model's `num_classes` and `image_shape` are linked from the datamodule, so a config names only the
network; checkpoints keep both the model's and the datamodule's hyperparameters (dataset, transform).
"""

# ruff: noqa: E402 - the stop signals are handled before the imports below, which take seconds
from __future__ import annotations

from common.stop import CommandExit, env_rank, modules_loading

# a signal while the modules load: its exit status and line, not a bare kill
with modules_loading(__name__ == "__main__"):
    import difflib
    import importlib
    import inspect
    import re
    import shutil
    import sys
    from pathlib import Path
    from typing import Any

    import lightning as L
    from jsonargparse import ArgumentError
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.cli import LightningCLI
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from callbacks import MarginCallback
    from callbacks.margin import terminal_print
    from common.errors import InputError
    from common.process import GRACE, TrainingControl
    from datamodules import FrequencyDataModule
    from lightning_modules import ClassifierModule
    from models.checkpoint import CheckpointReadError, UntrustedCheckpointError, read_checkpoint

ROOT_DIR = "${trainer.default_root_dir}"  # logger save_dir placeholder, replaced by the run's default_root_dir
# `--margin.rows.num_sample` is a typo of `num_samples`; usage errors raise (one line in `cli`), no usage text
_STRICT = {"allow_abbrev": False, "exit_on_error": False}
PARSER_KWARGS: dict[str, Any] = {**_STRICT, **{name: dict(_STRICT) for name in ("fit", "validate", "test", "predict")}}


class RunFolder(L.Callback):
    """The version folder this process reserved, and whether a stage ever started in it: a run that fails before
    (a missing data directory, a bad setting) leaves no empty folder for TensorBoard to list (`remove_if_unused`),
    nor the `<root>/<name>/` folders the reservation created."""

    reserved: Path | None = None
    created: Path | None = None  # the topmost folder the reservation created (None: `<root>/<name>/` existed)
    started = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        RunFolder.started = True

    on_validation_start = on_test_start = on_predict_start = on_fit_start

    @classmethod
    def reserve(cls, folder: Path) -> int:
        """`reserve_version(folder)`, remembering what it created."""
        cls.created = next((p for p in (*reversed(folder.parents), folder) if not p.exists()), None)
        version = reserve_version(folder)
        cls.reserved, cls.started = folder / f"version_{version}", False
        return version

    @classmethod
    def remove_if_unused(cls) -> None:
        if cls.reserved is None or cls.started or any(cls.reserved.rglob("*.ckpt")):
            return
        shutil.rmtree(cls.reserved, ignore_errors=True)
        if cls.created is not None:  # the empty parents up to the first one the reservation created
            for parent in cls.reserved.parents:
                if not parent.is_relative_to(cls.created) or any(parent.iterdir()):
                    break
                parent.rmdir()
        cls.reserved = cls.created = None


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
    """LightningCLI with the project's defaults, one-line usage errors and, from `cli()`, the process control of
    the run (`control`: `common.process.TrainingControl`, which adopts the trainer)."""

    def __init__(self, *args: Any, control: TrainingControl | None = None, **kwargs: Any):
        self.control = control
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(MarginCallback, "margin")  # `margin:` section, `--margin.rows.num_samples 20`
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
            init.version = RunFolder.reserve(Path(init.save_dir, init.get("name") or "").expanduser())

    def parse_arguments(self, parser, args) -> None:
        """LightningCLI's parsing; a usage error (an unknown option or config key, a value of the wrong type) is one
        line naming the nearest valid key first (`parse_error`)."""
        try:
            super().parse_arguments(parser, args)
        except ArgumentError as err:
            raise InputError(parse_error(str(err), self._valid_options(args))) from err

    def _valid_options(self, args) -> list[str]:
        """The option strings of the subcommand in `args` (of the main parser without one)."""
        argv = list(sys.argv[1:] if args is None else args) if not isinstance(args, dict) else []
        subcommand = next((a for a in argv if a in self.subcommands()), None)
        parser = getattr(self, "_subcommand_parsers", {}).get(subcommand, self.parser)
        return sorted({option for action in parser._actions for option in action.option_strings})

    def _parse_ckpt_path(self) -> None:
        """`--ckpt_path`: the file is checked first (one line for a missing file, a directory, a file that is not a
        checkpoint, or one holding pickled Python objects, which is read only with `--weights_only false`), then its
        hyperparameters update the model's config as LightningCLI does (it reads the file with weights_only=True
        whatever `--weights_only` says, so this replaces its reading)."""
        config = self.config.get(str(self.config.get("subcommand")), None)
        path = config.get("ckpt_path") if config is not None else None
        if not path or path in ("last", "best", "hpc", "registry"):
            return
        trusted = config.get("weights_only") is False
        try:
            checkpoint = read_checkpoint(path, trusted_pickle=trusted)
        except (UntrustedCheckpointError, CheckpointReadError) as err:
            found = re.search(r"GLOBAL ([\w.]+)", str(err.__cause__ or ""))
            if not found:
                raise
            raise InputError(
                f"--ckpt_path {path} holds pickled Python objects ({found.group(1)}), which are not loaded because "
                "unpickling can run arbitrary code; if (and only if) you trust this file, pass --weights_only false"
            ) from err
        if not isinstance(checkpoint, dict) or "pytorch-lightning_version" not in checkpoint:
            keys = ", ".join(map(str, list(checkpoint)[:6])) if isinstance(checkpoint, dict) else ""
            held = f"top-level keys {keys}" if keys else type(checkpoint).__name__
            raise InputError(
                f"--ckpt_path {path} is not a checkpoint of a Lightning run (it holds {held}); pass one train.py wrote "
                "(<run folder>/checkpoints/last.ckpt); evaluate_margin.py --checkpoint measures other weights' margins"
            )
        hparams = dict(checkpoint.get("hyper_parameters", {}))
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        self.config = self.parser.parse_object({self.config.subcommand: {"model": hparams}}, self.config)

    def instantiate_trainer(self, **kwargs: Any) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if self.control is not None:
            self.control.adopt(trainer)
        return trainer

    def instantiate_classes(self) -> None:
        """LightningCLI's instantiation; a constructor's refusal of a value (ValueError, TypeError, Lightning's
        MisconfigurationException, e.g. `--data.batch_size 0`, `--trainer.devices 0`) is one line."""
        try:
            super().instantiate_classes()
        except (ValueError, TypeError, MisconfigurationException) as err:
            raise configuration_error(err) from err


def configuration_error(err: BaseException) -> InputError:
    """The InputError for a refused value: the innermost message of the chain (jsonargparse wraps a constructor's
    error in its own), on one line."""
    cause = err
    while cause.__cause__ is not None and not isinstance(cause, InputError):
        cause = cause.__cause__
    if isinstance(cause, InputError):
        return cause
    return InputError(" ".join(str(cause).split()).rstrip("."))


def parse_error(message: str, options: list[str]) -> str:
    """jsonargparse's usage error as one line: unknown options and config keys with the nearest valid key first,
    an unknown setting of a class (`--data.init_args.batch_siz`) with the nearest of that class's settings, a
    value of the wrong type as "key: expected ..., got ..."."""
    if message.startswith("unrecognized arguments:"):
        unknown = [arg.split("=")[0] for arg in message.split(":", 1)[1].split() if arg.startswith("-")]
        return "; ".join(_unknown(arg, options, "an option") for arg in unknown) or message
    key = re.search(r"does not accept option '([^']+)'", message)
    if key:
        keys = [option.removeprefix("--") for option in options]
        return _unknown(key.group(1), keys, "a config key")
    setting = re.search(r"class_path '([\w.]+)':\s*Option '(\w+)' is not accepted", message)
    section = re.search(r'Parser key "([^"]+)"', message)
    if setting:
        prefix = f"{section.group(1)}.init_args." if section else ""
        names = [f"{prefix}{name}" for name in class_arguments(setting.group(1))]
        return _unknown(f"{prefix}{setting.group(2)}", names, f"a setting of {setting.group(1)}")
    return _type_error(message, section.group(1) if section else None)


def _unknown(name: str, valid: list[str], what: str) -> str:
    """ "X is not a <what>; did you mean A (or B, C)?", the nearest valid name first (difflib)."""
    near = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    if not near:
        return f"{name} is not {what} (see --help)"
    others = f" (or {', '.join(near[1:])})" if len(near) > 1 else ""
    return f"{name} is not {what}; did you mean {near[0]}{others}?"


def _type_error(message: str, key: str | None) -> str:
    """ "key: expected int or None, got 'x'" from jsonargparse's union report; else the message on one line."""
    lines = [line.strip() for line in message.splitlines()]
    errors = [line[2:] for line in lines if line.startswith("- ")]
    given = next((line.removeprefix("Given value:").strip() for line in lines if line.startswith("Given value:")), None)
    expected = [_type_name(e.removeprefix("Expected a ")) for e in errors if e.startswith("Expected a ")]
    if key and errors and len(expected) == len(errors):
        return f"{key}: expected {' or '.join(expected)}, got {given!r}"
    return " ".join(message.split())


def _type_name(text: str) -> str:
    """ "<class 'int'>" -> "int", "<class 'NoneType'>" -> "None"."""
    name = re.sub(r"<class '([\w.]+)'>", r"\1", text)
    return "None" if name == "NoneType" else name


def class_arguments(class_path: str) -> list[str]:
    """The constructor arguments of `class_path` and of the bases it forwards `**kwargs` to."""
    module, _, name = class_path.rpartition(".")
    try:
        klass = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return []
    names: list[str] = []
    for base in klass.__mro__:
        if "__init__" not in vars(base) or base is object:
            continue
        parameters = inspect.signature(base.__init__).parameters.values()
        names += [p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name != "self"]
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            break
    return list(dict.fromkeys(names))


def main(args: list[str] | None = None, run: bool = True, control: TrainingControl | None = None) -> HoldMeTightCLI:
    """Parse `args` (default: sys.argv) and run the subcommand; `run=False` only instantiates (no subcommand).
    `control`: the command's process control (`cli`)."""
    return HoldMeTightCLI(
        ClassifierModule,
        FrequencyDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs=PARSER_KWARGS,
        trainer_defaults={"callbacks": [RunFolder(), RunSummary()]},
        args=args,
        run=run,
        control=control,
    )


def cli(argv: list[str] | None = None) -> int:
    """`python train.py ...` (`argv`: default sys.argv), its process control around it (`TrainingControl`): an input
    error is one line `error: ...` (exit 2); a stop one line `stopped: ...` naming the rank, the cause and the command
    that resumes (exit 143 SIGTERM, 130 SIGINT, 138 SIGUSR1, 3 a lost process, 1 or 2 another rank failed); exit 0
    only when the subcommand finished; anything else is a bug: its traceback (exit 1)."""
    arguments = sys.argv[1:] if argv is None else argv
    with CommandExit(grace=GRACE) as command, TrainingControl(arguments) as control:
        try:
            main(argv, control=control)
        except InputError as err:
            RunFolder.remove_if_unused()
            if env_rank() == 0:
                print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
            return 2
        except BaseException as err:
            RunFolder.remove_if_unused()
            stop = control.outcome(err)
            if stop is None:
                raise
            return command.stopped(stop)
    return 0


if __name__ == "__main__":
    sys.exit(cli())
