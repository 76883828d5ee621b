"""Training under mixed precision on CPU: PGD's passes under autocast, its projections and norms in float32.

References: the dense flip matrix from scipy.fft (tests/test_dykstra.py) for validity after un-flipping, and the
same attack in float32 for the float16 gradients.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.datasets.cifar as tv_cifar
from torch import nn

import train
from attacks.pgd import L2PGD
from datamodules import MNISTDataModule
from lightning_modules import AdversarialModule
from tests.conftest import write_idx_mnist
from tests.test_dykstra import dense_flip
from tests.test_training import CONFIGS, write_image_folders


class AttackSpy:
    """Wraps a module's attack; records, per call, the clean and adversarial batches and whether autocast was on."""

    def __init__(self, attack):
        self.attack, self.calls = attack, []

    def __call__(self, model, x, y, generator=None):
        autocast = torch.is_autocast_enabled("cpu")
        x_adv = self.attack(model, x, y, generator)
        self.calls.append((x.detach().clone(), x_adv, autocast))
        return x_adv


@pytest.mark.parametrize("projection, flipped", [("exact", True), ("dykstra", True), ("ball_box", False)])
def test_bf16_mixed_adversarial_fit_keeps_perturbations_in_ball_and_box(tmp_path, projection, flipped):
    """A bf16-mixed fit on generated MNIST: PGD runs under autocast (the logits are bfloat16), and every
    adversarial batch is float32, within eps of its clean batch and valid (after un-flipping, dense scipy flip)."""
    write_idx_mnist(tmp_path, num_train=64, num_test=32)
    dm = MNISTDataModule(data_dir=str(tmp_path), transform="flip" if flipped else "none", batch_size=32)
    eps = 2.0
    module = AdversarialModule(net="lenet", eps=eps, attack_steps=3, projection=projection, flipped=flipped)
    spy = AttackSpy(module.attack)
    module.attack = spy
    logits_dtypes = []
    module.model.register_forward_hook(lambda mod, inp, out: logits_dtypes.append(out.dtype))
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        precision="bf16-mixed",
        max_epochs=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, dm)
    assert len(spy.calls) == 2 + 1  # two training batches, one validation batch
    assert all(autocast for *_, autocast in spy.calls[:2])  # the training step (and so PGD) ran under autocast
    assert torch.bfloat16 in logits_dtypes
    for x, x_adv, _ in spy.calls:
        assert x_adv.dtype == torch.float32 and x.dtype == torch.float32
        distance = (x_adv - x).flatten(1).norm(dim=1)
        assert (distance <= eps * (1 + 1e-6)).all() and (distance > 0).all()
        pixels = dense_flip(x_adv) if flipped else x_adv
        assert pixels.min() >= -1e-6 and pixels.max() <= 1 + 1e-6  # measured <= 1.2e-7 outside (flip rounding)
        if not flipped:
            assert pixels.min() >= 0 and pixels.max() <= 1
    assert torch.isfinite(torch.stack([p.detach().float().sum() for p in module.parameters()])).all()


class Scale(nn.Module):
    def __init__(self, factor: float):
        super().__init__()
        self.factor = factor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.factor * x


def _confident_model() -> nn.Module:
    """A small conv net on 8x8 images with logits scaled by 300: its softmax saturates, and the cross-entropy
    gradients of most correctly classified samples (below 6e-8) vanish in float16."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 64, 3), Scale(300.0)).eval()


def test_float16_autocast_pgd_steps_every_sample_like_float32():
    """Reference: the same attack in float32. The plain float16 input gradient of some samples underflows to zero
    (checked, so the test can fail); PGD's per-sample rescaled logit gradients keep every step's direction."""
    model = _confident_model()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(16, 1, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)  # correctly classified: the loss is saturated
    xg = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.float16):
        (plain,) = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    assert (plain.flatten(1).norm(dim=1) == 0).any()  # the failure mode exists here
    attack = L2PGD(0.5, steps=1, step_size=0.1, random_start=False, projection="ball")
    reference = attack(model, x, y) - x
    with torch.autocast("cpu", dtype=torch.float16):
        step = attack(model, x, y) - x
    assert step.dtype == torch.float32
    cosine = F.cosine_similarity(step.flatten(1), reference.flatten(1), dim=1)
    assert (step.flatten(1).norm(dim=1) > 0.099).all() and (cosine > 0.99).all()


def write_cifar10(root: Path, n: int = 8) -> None:
    """Random CIFAR-10 batches in torchvision's pickle layout (its md5 check is patched off by the test)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "labels": [int(v) for v in rng.integers(0, 10, n)]}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


HEAVY = ("imagenet",)  # ResNet-50 at 224x224: seconds per config on CPU


@pytest.mark.parametrize(
    "config",
    [pytest.param(c, marks=pytest.mark.slow) if any(h in c.stem for h in HEAVY) else c for c in CONFIGS],
    ids=[c.stem for c in CONFIGS],
)
def test_every_config_trains_under_bf16_mixed(config, tmp_path, monkeypatch):
    """Two training steps of each experiment's config with `--trainer.precision bf16-mixed` on generated data
    (batch 2, one PGD step for the robust ones): the model's forward runs in bfloat16, the loss stays finite and
    the weights move."""
    text = config.read_text()
    if "ImageNetDataModule" in text:
        write_image_folders(tmp_path)
    if "MNISTDataModule" in text:
        write_idx_mnist(tmp_path, num_train=8, num_test=8)
    if "CIFAR10DataModule" in text:
        write_cifar10(tmp_path)
        monkeypatch.setattr(tv_cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))
    args = ["--config", str(config), "--data.data_dir", str(tmp_path), "--trainer.precision", "bf16-mixed",
            "--trainer.max_steps", "2", "--trainer.limit_val_batches", "0", "--trainer.num_sanity_val_steps", "0",
            "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--margin.enabled", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.callbacks", "[]"]  # fmt: skip
    if "SyntheticDataModule" in text:
        args += ["--data.init_args.num_train", "8", "--data.init_args.num_test", "8"]
    else:
        args += ["--data.init_args.batch_size", "2"]
    if "robust" in config.stem:
        args += ["--model.init_args.attack_steps", "1"]
    cli = train.main(args, run=False)
    dtypes, losses = [], []
    cli.model.model.register_forward_hook(lambda mod, inp, out: dtypes.append(out.dtype))
    original = cli.model.training_step

    def training_step(batch, batch_idx):
        loss = original(batch, batch_idx)
        losses.append(loss.detach().float())
        return loss

    cli.model.training_step = training_step
    before = [p.detach().clone() for p in cli.model.parameters()]
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 2
    assert torch.bfloat16 in dtypes
    assert len(losses) == 2 and all(torch.isfinite(loss) for loss in losses)
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, cli.model.parameters()))
