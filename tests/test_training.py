"""Training stack: learning-rate schedule, standard and adversarial modules, LightningCLI configs, resuming."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

import train
from attacks.pgd import L2PGD
from common import InputError
from datamodules import MNISTDataModule, SyntheticDataModule
from lightning_modules import AdversarialModule, ClassifierModule
from lightning_modules.schedules import triangular_lr
from lightning_modules.trainers import quiet_trainer
from tests.test_datamodules import write_mnist_raw

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def tiny_synthetic(**kwargs) -> SyntheticDataModule:
    args = dict(image_shape=(1, 16, 16), num_train=512, num_test=128, batch_size=64, sigma=0.5, eps=4.0)
    return SyntheticDataModule(**{**args, **kwargs})


def tiny_trainer(tmp_path: Path, **kwargs) -> L.Trainer:
    return quiet_trainer(**{"default_root_dir": tmp_path, **kwargs})


def test_triangular_schedule_matches_its_definition():
    total = 250
    expected = np.interp((np.arange(total) + 1) / total, [0.0, 0.4, 1.0], [0.0, 0.21, 0.0])
    got = np.array([triangular_lr(i, total, 0.21) for i in range(total)])
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert got.max() == pytest.approx(0.21) and got[-1] == 0.0 and got[0] > 0.0
    with pytest.raises(ValueError):
        triangular_lr(0, 0, 0.21)


class RecordLR(L.Callback):
    def __init__(self):
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_module_applies_the_schedule_per_step_and_learns(tmp_path):
    dm = tiny_synthetic()
    L.seed_everything(0)
    model = ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16), lr=0.2)
    record = RecordLR()
    trainer = tiny_trainer(tmp_path, max_epochs=3, callbacks=[record])
    trainer.fit(model, dm)
    total = 3 * 8  # 512 samples / batch 64, 3 epochs
    expected = [triangular_lr(i, total, 0.2) for i in range(total)]
    np.testing.assert_allclose(record.lrs, expected, rtol=1e-9)
    metrics = trainer.callback_metrics
    for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
        assert key in metrics
    assert metrics["val/acc"] > 0.9  # separable data: margin eps=4 along v, noise sigma=0.5


def test_datamodule_normalization_is_copied_into_the_model(tmp_path, mnist_root):
    dm = MNISTDataModule(data_dir=str(mnist_root), transform="flip", batch_size=256)
    model = ClassifierModule(net="lenet", num_classes=10, image_shape=(1, 28, 28))
    trainer = tiny_trainer(tmp_path, max_steps=1, limit_val_batches=1, num_sanity_val_steps=0)
    trainer.fit(model, dm)
    expected = dm.normalization()
    torch.testing.assert_close(model.model.normalize.mean, expected.mean)
    torch.testing.assert_close(model.model.normalize.std, expected.std)
    assert model.model.normalize.mean.std() > 0  # a flipped mean image, not a constant


def robust_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> float:
    attack = L2PGD(eps=eps, steps=10, generator=torch.Generator().manual_seed(1))
    x_adv = attack(model, x, y)
    with torch.no_grad():
        return (model(x_adv).argmax(1) == y).float().mean().item()


@pytest.mark.slow
def test_adversarial_training_is_more_robust_than_standard_training(tmp_path, mnist_root):
    eps, steps = 2.0, 150
    results = {}
    for name, module in (
        ("standard", ClassifierModule(net="lenet", lr=0.05)),
        ("adversarial", AdversarialModule(net="lenet", lr=0.05, eps=eps, attack_steps=3, eval_attack=False)),
    ):
        L.seed_everything(0)
        dm = MNISTDataModule(data_dir=str(mnist_root), batch_size=128)
        trainer = tiny_trainer(tmp_path / name, max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0)
        trainer.fit(module, dm)
        x, y = next(iter(torch.utils.data.DataLoader(dm.test_set, batch_size=300)))
        module.eval()
        with torch.no_grad():
            clean = (module.model(x).argmax(1) == y).float().mean().item()
        results[name] = (clean, robust_accuracy(module.model, x, y, eps))
    assert results["standard"][0] > 0.8 and results["adversarial"][0] > 0.6
    assert results["adversarial"][1] > results["standard"][1] + 0.2, results


def test_adversarial_module_logs_robust_accuracy_and_trains_on_attacked_batches(tmp_path):
    dm = tiny_synthetic()
    module = AdversarialModule(net="lenet", num_classes=2, image_shape=(1, 16, 16), lr=0.05, eps=0.5, clip=False)
    seen = []
    original = module.attack.__call__

    def spy(model, x, y, generator=None):
        x_adv = original(model, x, y, generator)
        seen.append(((x_adv - x).flatten(1).norm(dim=1).max().item(), torch.is_grad_enabled()))
        return x_adv

    module.attack = type("Spy", (), {"__call__": staticmethod(spy)})()
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=3, limit_val_batches=2, num_sanity_val_steps=0)
    trainer.fit(module, dm)
    assert "val/robust_acc" in trainer.callback_metrics and "val/acc" in trainer.callback_metrics
    assert len(seen) == 3 + 2  # every training batch and every validation batch attacked
    assert all(0.0 < norm <= 0.5 + 1e-5 for norm, _ in seen)


def write_image_folders(root: Path, size: int = 40) -> None:
    """Two classes of two random RGB PNGs in `root/{train,val}/class{0,1}/` (the ImageNet folder layout)."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(2):
            (root / split / f"class{c}").mkdir(parents=True)
            for k in range(2):
                pixels = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / f"class{c}" / f"img{k}.png")


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_instantiates_its_experiment(config, tmp_path):
    """Generated data (no ../shared/data): a 64-image MNIST in the raw idx layout, random PNG folders for
    ImageNet; CIFAR-10 is only instantiated (torchvision md5-checks its files)."""
    text = config.read_text()
    data_dir = tmp_path
    if "ImageNetDataModule" in text:
        write_image_folders(tmp_path)
    if "MNISTDataModule" in text:
        write_mnist_raw(tmp_path)
    cli = train.main(
        ["--config", str(config), "--data.data_dir", str(data_dir), "--trainer.logger", "false"], run=False
    )
    name = config.stem
    hp, dhp = cli.model.hparams, cli.datamodule.hparams
    assert hp.image_shape == cli.datamodule.image_shape and hp.num_classes == cli.datamodule.num_classes
    assert dhp.dataset == name.split("_")[0]
    assert dhp.transform == ("flip" if "flipped" in name else "low_pass" if "lowpass" in name else "none")
    assert isinstance(cli.model, AdversarialModule) == ("robust" in name)
    if "robust" in name:
        assert hp.eps == {"mnist": 2.0, "cifar10": 1.0, "imagenet": 3.0}[dhp.dataset]
        assert hp.projection == ("exact" if "flipped" in name else "ball_box") and hp.flipped == ("flipped" in name)
    expected_net = {"lenet": "lenet", "resnet18": "resnet18", "vgg19": "vgg19", "densenet121": "densenet121"}
    net_word = name.split("_")[-1]
    if dhp.dataset == "mnist" and net_word == "resnet18":
        assert hp.net == "resnet18_mnist"
    elif net_word in expected_net:
        assert hp.net == expected_net[net_word]
    assert cli.trainer.gradient_clip_val == 0.5
    assert any(type(cb).__name__ == "MarginCallback" for cb in cli.trainer.callbacks)
    if dhp.dataset in ("mnist", "cifar10"):
        assert cli.trainer.max_epochs == 30 and dhp.batch_size == 128 and hp.lr == 0.21
    if dhp.dataset != "cifar10":  # the generated data loads and gets the model's input shape
        cli.datamodule.setup("fit")
        x, _ = cli.datamodule.margin_dataset()[0]
        assert tuple(x.shape) == hp.image_shape
        assert cli.datamodule.normalization().mean.shape == hp.image_shape


class StopAfterEpochs(L.Callback):
    """Interrupts fit after `epochs` epochs, as a preempted job would be (max_epochs stays the run's own)."""

    def __init__(self, epochs: int = 1):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 >= self.epochs:
            trainer.should_stop = True


def test_resume_keeps_the_schedule_of_the_interrupted_run(tmp_path):
    """Reference: the uninterrupted 4-epoch triangular schedule by np.interp (the release's recipe), per step."""
    ckpt = tmp_path / "interrupted.ckpt"
    L.seed_everything(0)
    first = tiny_trainer(tmp_path, max_epochs=4, callbacks=[StopAfterEpochs(2)], limit_val_batches=0)
    first.fit(ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16), lr=0.2), tiny_synthetic())
    assert first.global_step == 16  # 2 of 4 epochs, 8 steps each
    first.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["lr_schedule"] == {"total_steps": 32, "max_epochs": 4}

    record = RecordLR()
    model = ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16), lr=0.2)
    resumed = tiny_trainer(tmp_path, max_epochs=4, callbacks=[record], limit_val_batches=0)
    resumed.fit(model, tiny_synthetic(), ckpt_path=ckpt)
    expected = np.interp((np.arange(16, 32) + 1) / 32, [0.0, 0.4, 1.0], [0.0, 0.2, 0.0])
    np.testing.assert_allclose(record.lrs, expected, rtol=1e-12, atol=0)

    with pytest.raises(InputError, match=r"spans 32 optimizer steps \(max_epochs=4\).*--trainer.max_epochs 4"):
        tiny_trainer(tmp_path, max_epochs=6, limit_val_batches=0).fit(model, tiny_synthetic(), ckpt_path=ckpt)


def test_fresh_fit_from_loaded_weights_may_choose_its_own_schedule(tmp_path):
    """A new run from a checkpoint's weights (no ckpt_path) is not a resume: any max_epochs is accepted."""
    ckpt = tmp_path / "done.ckpt"
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_val_batches=0)
    trainer.fit(ClassifierModule(net="lenet", num_classes=2, image_shape=(1, 16, 16)), tiny_synthetic())
    trainer.save_checkpoint(ckpt)
    model = ClassifierModule.load_from_checkpoint(ckpt, map_location="cpu")
    again = tiny_trainer(tmp_path, max_epochs=2, limit_val_batches=0)
    again.fit(model, tiny_synthetic())
    assert again.global_step == 16 and model._schedule == {"total_steps": 16, "max_epochs": 2}


def test_cli_fit_then_resume_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    common = [
        "--config", "configs/synthetic_lenet.yaml",
        "--data.init_args.num_train", "256", "--data.init_args.num_test", "64", "--data.init_args.batch_size", "64",
        "--margin.enabled", "false", "--trainer.max_epochs", "2",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip
    train.main(["fit", *common, "--trainer.callbacks+=tests.test_training.StopAfterEpochs"])
    last = next(tmp_path.rglob("last.ckpt"))
    first = torch.load(last, weights_only=True, map_location="cpu")
    assert first["global_step"] == 4 and first["epoch"] == 0
    with pytest.raises(InputError, match="--trainer.max_epochs 2"):
        train.main(["fit", *common, "--trainer.max_epochs", "3", "--ckpt_path", str(last)])
    monkeypatch.setattr(
        sys, "argv", ["train.py", "fit", *common, "--trainer.max_epochs", "3", "--ckpt_path", str(last)]
    )
    assert train.cli() == 2  # the command line: one line, exit 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: cannot resume") and "--trainer.max_epochs 2" in error
    train.main(["fit", *common, "--ckpt_path", str(last)])
    resumed = torch.load(max(tmp_path.rglob("last.ckpt"), key=lambda p: p.stat().st_mtime), map_location="cpu")
    assert resumed["global_step"] == 8 and resumed["epoch"] == 1
    assert resumed["lr_schedule"] == {"total_steps": 8, "max_epochs": 2}
    assert resumed["datamodule_hyper_parameters"]["dataset"] == "synthetic"
    assert resumed["hyper_parameters"]["net"] == "lenet"


def _same_state(a, b, path: str = "checkpoint") -> None:
    """Recursive bit-for-bit comparison of two checkpoint entries (tensors with torch.equal, the rest with ==)."""
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _same_state(a[key], b[key], f"{path}[{key!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _same_state(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_the_same_command_twice_gives_bit_identical_checkpoints(tmp_path, tiny_mnist_root):
    """CPU training is deterministic: two runs of one command (flipped robust LeNet: data shuffling, PGD's random
    start, the exact projection, the robust validation) save the same weights, optimizer and schedule state bit for
    bit; only the run folder differs (version_0, version_1), in the checkpoint callback's paths."""
    command = [
        "fit", "--config", "configs/mnist_flipped_robust_lenet.yaml", "--data.data_dir", str(tiny_mnist_root),
        "--data.init_args.batch_size", "16", "--trainer.max_epochs", "2", "--trainer.limit_val_batches", "1",
        "--model.init_args.attack_steps", "3", "--margin.enabled", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    train.main(command)
    train.main(command)
    runs = [tmp_path / "mnist_flipped_robust_lenet" / f"version_{v}" for v in (0, 1)]
    first, second = (torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu") for run in runs)
    assert first["global_step"] == 8  # 64 images / 16, two epochs
    first_text = str(first["callbacks"]).replace(str(runs[0]), "<run>")
    assert first_text == str(second["callbacks"]).replace(str(runs[1]), "<run>")
    for key in first.keys() - {"callbacks"}:
        _same_state(first[key], second[key], key)
    assert any(not torch.equal(p, torch.zeros_like(p)) for p in first["state_dict"].values())
