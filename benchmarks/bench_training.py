"""Training step costs on CPU: Lightning's overhead, adversarial steps against k + 1 standard steps, DDP throughput.

1. LeNet on MNIST batches of 128 (real MNIST if found, else random images): the Lightning module against a plain
   PyTorch loop doing the same work (forward, cross-entropy, accuracy update, backward, gradient-norm clipping 0.5,
   SGD step, per-step learning-rate schedule), so the difference is Lightning's own overhead.
2. For LeNet/MNIST (batches of 128) and a CIFAR-10 ResNet-18 on random 3x32x32 batches of 16: a standard step; a
   k-step L2 PGD step on plain data with the box (`ball_box`) and with the exact projection; on frequency-flipped
   data with the exact projection and with Dykstra's algorithm; and the reference (k + 1) x standard (k forward and
   backward passes of the attack plus the training step; a reference cost, not a lower bound: attack passes can
   be cheaper than training passes).
3. 1 vs 2 CPU processes (gloo DDP, one thread each, the same global batch split across the processes): standard
   steps, samples/s per process and in all, for both models.

    python benchmarks/bench_training.py [--data-dir ../shared/data] [--threads 1] [--repeats 2] [--skip-ddp]

Sections 1 and 2 run on `--threads` threads (default 1) and report CPU time per step (process time, which other
processes on a shared machine barely move; on an idle machine and one thread it is the wall time); each figure is
the best of `--repeats` interleaved runs. Section 3 reports wall time, the processes waiting for each other.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
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
from lightning_modules.trainers import quiet_trainer  # noqa: E402


@dataclass
class Setup:
    """One model and its batches: `net` and `image_shape` as in `ClassifierModule`; `steps` timed standard steps
    (the PGD runs time `steps // (k + 1)`, at least 3) after `warmup` untimed ones."""

    name: str
    net: str
    image_shape: tuple[int, int, int]
    batch: int
    steps: int
    warmup: int
    eps: float


def mnist_images(data_dir: Path, n: int) -> TensorDataset:
    from torchvision.datasets import MNIST

    try:
        ds = MNIST(root=str(data_dir), train=True, download=False)
        return TensorDataset(ds.data[:n].unsqueeze(1).float() / 255.0, ds.targets[:n])
    except RuntimeError:
        print(f"MNIST not found under {data_dir}: random images")
        return TensorDataset(torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,)))


def random_images(shape: tuple[int, int, int], n: int) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g))


class StepTimer(L.Callback):
    """Time from the first timed to the last training batch (excludes setup and `warmup` steps), per step; `clock`
    is `time.process_time` (CPU time of this process) or `time.perf_counter` (wall time)."""

    def __init__(self, warmup: int = 10, clock=time.process_time):
        self.warmup, self.clock, self.start, self.end, self.steps = warmup, clock, 0.0, 0.0, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == self.warmup:
            self.start = self.clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end, self.steps = self.clock(), batch_idx + 1 - self.warmup

    @property
    def per_step(self) -> float:
        return (self.end - self.start) / self.steps


def step_trainer(steps: int, callbacks: list, **kwargs) -> L.Trainer:
    """`quiet_trainer` for `steps` training steps without validation."""
    args = dict(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, callbacks=callbacks)
    return quiet_trainer(**{**args, **kwargs})


def lightning_step_time(module: L.LightningModule, data: TensorDataset, batch: int, steps: int, warmup: int) -> float:
    timer = StepTimer(warmup)
    step_trainer(warmup + steps, [timer]).fit(module, DataLoader(data, batch_size=batch))
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
            start = time.process_time()
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
    return (time.process_time() - start) / (steps - warmup)


def lightning_overhead(data_dir: Path) -> None:
    steps = 200
    data = mnist_images(data_dir, steps * 128)
    plain = min(plain_step_time(data, steps) for _ in range(2))
    lightning = min(lightning_step_time(ClassifierModule(net="lenet"), data, 128, steps - 10, 10) for _ in range(2))
    print(f"LeNet, MNIST batches of 128: plain PyTorch loop {plain * 1e3:.2f} ms/step, Lightning module "
          f"{lightning * 1e3:.2f} ms/step (overhead {100 * (lightning / plain - 1):+.1f}%)")  # fmt: skip


def adversarial_costs(setup: Setup, data: TensorDataset, k: int, repeats: int) -> None:
    """Standard and PGD-k step times of one model, and each PGD step's ratio to k + 1 standard steps."""
    flipped_data = TensorDataset(flip(data.tensors[0]), data.tensors[1])
    common = dict(net=setup.net, image_shape=setup.image_shape, eps=setup.eps, attack_steps=k, eval_attack=False)
    variants = {  # name: (module factory, data)
        "standard step": (lambda: ClassifierModule(net=setup.net, image_shape=setup.image_shape), data),
        f"PGD-{k}, box (ball then box)": (lambda: AdversarialModule(projection="ball_box", **common), data),
        f"PGD-{k}, exact ball ∩ box": (lambda: AdversarialModule(projection="exact", **common), data),
        f"PGD-{k} flipped, exact": (
            lambda: AdversarialModule(projection="exact", flipped=True, **common),
            flipped_data,
        ),
        f"PGD-{k} flipped, Dykstra": (
            lambda: AdversarialModule(projection="dykstra", flipped=True, **common),
            flipped_data,
        ),
    }
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(repeats):  # interleaved, so that a burst of load on a shared machine hits every variant alike
        for name, (factory, variant_data) in variants.items():
            torch.manual_seed(0)
            steps = setup.steps if name == "standard step" else max(3, setup.steps // (k + 1))
            warmup = setup.warmup if name == "standard step" else max(1, setup.warmup // (k + 1))
            seconds = lightning_step_time(factory(), variant_data, setup.batch, steps, warmup)
            best[name] = min(best[name], seconds)
    standard = best["standard step"]
    reference = (k + 1) * standard  # k attack passes and the training step, at a training step's cost
    print(f"\n{setup.name}, batches of {setup.batch} x {'x'.join(map(str, setup.image_shape))}, eps {setup.eps:g}:")
    print(f"  {'standard step':32s} {standard * 1e3:9.2f} ms (CPU time)")
    print(f"  {f'({k} + 1) x standard':32s} {reference * 1e3:9.2f} ms")
    for name in list(variants)[1:]:
        print(f"  {name:32s} {best[name] * 1e3:9.2f} ms = {best[name] / reference:.3f} x ({k} + 1) standard")


def ddp_worker(args: argparse.Namespace) -> None:
    """One `--processes`-process gloo DDP fit of standard steps; every rank writes its step time to `--out`."""
    from lightning.pytorch.strategies import DDPStrategy

    setup = SETUPS[args.ddp_worker]
    per_process = setup.batch // args.processes
    data = random_images(setup.image_shape, setup.batch * (setup.warmup + setup.steps))
    wall, cpu = StepTimer(setup.warmup, time.perf_counter), StepTimer(setup.warmup, time.process_time)
    strategy = DDPStrategy(process_group_backend="gloo") if args.processes > 1 else "auto"
    trainer = step_trainer(setup.warmup + setup.steps, [wall, cpu], devices=args.processes, strategy=strategy)
    module = ClassifierModule(net=setup.net, image_shape=setup.image_shape)
    trainer.fit(module, DataLoader(data, batch_size=per_process))
    record = {"seconds": wall.per_step, "cpu": cpu.per_step, "batch": per_process, "threads": torch.get_num_threads()}
    Path(f"{args.out}.{trainer.global_rank}").write_text(json.dumps(record))


def ddp_throughput(name: str, processes: int, timeout: float = 600.0) -> list[dict]:
    """Run `ddp_worker` in a fresh process (Lightning's DDP launcher re-runs its command line per rank)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rank"
        cmd = [sys.executable, __file__, "--ddp-worker", name, "--processes", str(processes), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # one thread per process, 1 or 2 cores in use
        subprocess.run(cmd, check=True, timeout=timeout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in range(processes)]


def ddp_scaling(names: list[str]) -> None:
    load = os.getloadavg()[0]
    print(f"\nDDP on CPU (gloo, {os.cpu_count()} cores, load average {load:.1f} before), standard steps, wall time "
          "(and the CPU time of the busiest process), the same global batch split:")  # fmt: skip
    for name in names:
        base = None
        for processes in (1, 2):
            ranks = ddp_throughput(name, processes)
            step = max(r["seconds"] for r in ranks)  # the processes wait for each other at every all-reduce
            total = sum(r["batch"] for r in ranks) / step
            base = base or total
            print(f"  {name:22s} {processes} process{'es' if processes > 1 else '  '} x {ranks[0]['threads']} "
                  f"thread(s), batch {ranks[0]['batch']:3d} each: {step * 1e3:8.2f} ms/step "
                  f"(CPU {max(r['cpu'] for r in ranks) * 1e3:7.2f}), {ranks[0]['batch'] / step:7.1f} samples/s per "
                  f"process, {total:7.1f} in all ({total / base:.2f}x)")  # fmt: skip


def quiet() -> None:
    """No Lightning banners, tips or warnings between the figures."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


SETUPS = {
    "LeNet/MNIST": Setup("LeNet/MNIST", "lenet", (1, 28, 28), batch=128, steps=120, warmup=16, eps=2.0),
    "ResNet-18/32x32x3": Setup("ResNet-18/32x32x3", "resnet18", (3, 32, 32), batch=16, steps=16, warmup=4, eps=1.0),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data")
    parser.add_argument("--attack-steps", type=int, default=7, help="k, the PGD steps")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each variant; the best counts")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for sections 1 and 2")
    parser.add_argument("--skip-ddp", action="store_true")
    parser.add_argument("--ddp-worker", choices=list(SETUPS), help=argparse.SUPPRESS)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    quiet()
    if args.ddp_worker:
        ddp_worker(args)
        return
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, lightning {L.__version__}, {torch.get_num_threads()} thread(s), CPU")
    lightning_overhead(args.data_dir)
    lenet = SETUPS["LeNet/MNIST"]
    mnist = mnist_images(args.data_dir, lenet.batch * (lenet.warmup + lenet.steps))
    adversarial_costs(lenet, mnist, args.attack_steps, args.repeats)
    resnet = SETUPS["ResNet-18/32x32x3"]
    adversarial_costs(resnet, random_images(resnet.image_shape, resnet.batch * (resnet.warmup + resnet.steps)),
                      args.attack_steps, args.repeats)  # fmt: skip
    if not args.skip_ddp:
        ddp_scaling(list(SETUPS))
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
