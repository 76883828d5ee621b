"""Time per training step: the Lightning modules against a plain PyTorch loop, and adversarial vs standard steps.

LeNet on MNIST batches of 128 (real MNIST if found, else random images), CPU. The plain loop does the same
work as `ClassifierModule.training_step` (forward, cross-entropy, accuracy update, backward, gradient-norm
clipping 0.5, SGD step, per-step learning-rate schedule) so the difference is Lightning's own overhead.

    python benchmarks/bench_training.py [--steps 300] [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from frequency import flip  # noqa: E402
from lightning_modules import AdversarialModule, ClassifierModule  # noqa: E402
from lightning_modules.schedules import triangular_lr  # noqa: E402


def mnist_batches(data_dir: Path, count: int) -> TensorDataset:
    from torchvision.datasets import MNIST

    n = count * 128
    try:
        ds = MNIST(root=str(data_dir), train=True, download=False)
        return TensorDataset(ds.data[:n].unsqueeze(1).float() / 255.0, ds.targets[:n])
    except RuntimeError:
        print(f"MNIST not found under {data_dir}: random images")
        return TensorDataset(torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,)))


class StepTimer(L.Callback):
    """Wall time from the first to the last training batch (excludes setup), per step."""

    def __init__(self, warmup: int = 10):
        self.warmup, self.start, self.end, self.steps = warmup, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end, self.steps = time.perf_counter(), batch_idx + 1 - self.warmup

    @property
    def per_step(self) -> float:
        return (self.end - self.start) / self.steps


def lightning_step_time(module: L.LightningModule, data: TensorDataset, steps: int) -> float:
    timer = StepTimer()
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        gradient_clip_val=0.5,
        callbacks=[timer],
    )
    trainer.fit(module, DataLoader(data, batch_size=128))
    return timer.per_step


def plain_step_time(data: TensorDataset, steps: int, warmup: int = 10) -> float:
    model = ClassifierModule(net="lenet").model  # the same NormalizedModel(LeNet), outside Lightning
    optimizer = torch.optim.SGD(model.parameters(), lr=0.21, momentum=0.9, weight_decay=5e-4)
    scheduler = LambdaLR(optimizer, lambda step: triangular_lr(step, steps, 1.0))
    accuracy = MulticlassAccuracy(num_classes=10, average="micro")
    model.train()
    start = 0.0
    for i, (x, y) in enumerate(DataLoader(data, batch_size=128)):
        if i == warmup:
            start = time.perf_counter()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        accuracy.update(logits, y)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        optimizer.step()
        scheduler.step()
        if i + 1 == steps:
            break
    return (time.perf_counter() - start) / (steps - warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--adversarial-steps", type=int, default=60)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    args = parser.parse_args()
    torch.manual_seed(0)
    data = mnist_batches(args.data_dir, args.steps)
    print(f"LeNet, MNIST batches of 128, torch {torch.__version__}, {torch.get_num_threads()} threads")

    plain = min(plain_step_time(data, args.steps) for _ in range(2))
    lightning = min(lightning_step_time(ClassifierModule(net="lenet"), data, args.steps) for _ in range(2))
    print(f"plain PyTorch loop:      {plain * 1e3:7.2f} ms/step")
    print(f"Lightning module:        {lightning * 1e3:7.2f} ms/step  (overhead {100 * (lightning / plain - 1):+.1f}%)")

    flip_data = TensorDataset(flip(data.tensors[0]), data.tensors[1])  # Dykstra needs valid flipped inputs
    n = args.adversarial_steps
    adversarial = lightning_step_time(AdversarialModule(net="lenet", eps=2.0, attack_steps=7), data, n)
    flipped = AdversarialModule(net="lenet", eps=2.0, attack_steps=7, projection="dykstra", flipped=True)
    dykstra = lightning_step_time(flipped, flip_data, n)
    print(f"adversarial, 7-step L2 PGD:   {adversarial * 1e3:7.2f} ms/step = {adversarial / lightning:.1f}x standard")
    print(f"  flipped, Dykstra projection: {dykstra * 1e3:7.2f} ms/step = {dykstra / lightning:.1f}x standard")


if __name__ == "__main__":
    main()
