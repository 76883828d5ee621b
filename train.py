"""Train and evaluate with LightningCLI.

    python train.py fit --config configs/mnist_lenet.yaml [--trainer.max_epochs 3] [--data.data_dir ...]
    python train.py test --config configs/mnist_lenet.yaml --ckpt_path path/to/last.ckpt
    python train.py fit --config configs/cifar10_resnet18.yaml --trainer.strategy ddp --trainer.devices 4

The model's `num_classes` and `image_shape` are linked from the datamodule, so a config names only the
network; checkpoints keep both the model's and the datamodule's hyperparameters (dataset, transform).
"""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from callbacks import MarginCallback
from datamodules import FrequencyDataModule
from lightning_modules import ClassifierModule


class HoldMeTightCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(MarginCallback, "margin")  # `margin:` section, `--margin.num_samples 20`
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.image_shape", "model.init_args.image_shape", apply_on="instantiate")


def main(args: list[str] | None = None, run: bool = True) -> HoldMeTightCLI:
    """Parse `args` (default: sys.argv) and run the subcommand; `run=False` only instantiates (no subcommand)."""
    return HoldMeTightCLI(
        ClassifierModule,
        FrequencyDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
