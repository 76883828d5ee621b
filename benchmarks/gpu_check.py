"""Checks and figures of the margin engine on a GPU, in one command (under 8 minutes on one GPU).

    python benchmarks/gpu_check.py                 # on CUDA; without CUDA it says so and exits 0
    python benchmarks/gpu_check.py --device cpu --quick   # the same steps, small, on the CPU (the tests run this)

It prints, each on its own lines:
1. margins: float32 margins on the device against float64 on the CPU for the same rows (LeNet, 20 samples x 21
   DCT subspaces): median and max relative difference, and how many rows agree on their iteration count;
2. TF32: PyTorch's settings outside the attack and the engine's precision record (TF32 is off inside it);
3. ResNet-50 at 224x224 (random weights, 16x16 DCT blocks): rows per second, row-iterations per second and the
   fill of the model passes at 64, 256 and 1024 rows per chunk (`--chunk-rows`);
4. `kernels="auto"` against `"off"` on the device: time and whether the margins are bit-identical;
5. a 50-step single-device `train.py fit` (synthetic data, LeNet) with the margin callback: exit status, time, the
   callback's result folder;
6. `evaluate_margin.py` on that checkpoint with `--accelerator gpu --devices 1` against `--accelerator cpu`: median
   and max relative difference of the margins.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attacks.common import precision_record  # noqa: E402
from attacks.deepfool import SubspaceDeepFool  # noqa: E402
from attacks.estimator import PassStats  # noqa: E402
from frequency import DCTBlockSubspaces  # noqa: E402
from models import Normalize, NormalizedModel, build_model  # noqa: E402


def relative(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.double().cpu() - b.double().cpu()).abs() / b.double().cpu().clamp_min(1e-12)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_margins(device: torch.device, quick: bool) -> None:
    """1. float32 on the device against float64 on the CPU, same rows."""
    torch.manual_seed(0)
    model = NormalizedModel(Normalize(0.1307, 0.3081, (1, 28, 28)), build_model("lenet")).eval()
    x = torch.rand(5 if quick else 20, 1, 28, 28)
    family = DCTBlockSubspaces((1, 28, 28), 8, 1)
    exact = SubspaceDeepFool(dtype=torch.float64, max_iter=30)(model, x, family)
    single = SubspaceDeepFool(max_iter=30)(model.to(device), x.to(device), family)
    rel = relative(single.margins, exact.margins)
    same = float((single.iterations.cpu() == exact.iterations).float().mean())
    print(f"[1] margins {device} float32 vs cpu float64 ({rel.numel()} rows): relative difference median "
          f"{rel.median():.2e}, max {rel.max():.2e}; iterations equal on {same:.3f} of the rows")  # fmt: skip


def check_tf32(device: torch.device) -> None:
    """2. TF32 settings outside the attack, and the engine's record of its own."""
    outside = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    print(f"[2] TF32 outside the attack: matmul {outside[0]}, cudnn {outside[1]}; "
          f"inside (engine record): {precision_record(device, torch.float32)}")  # fmt: skip


def resnet50_rows(device: torch.device, quick: bool, chunk_sizes: list[int]) -> None:
    """3. and 4. ResNet-50 224x224: rows/s and fill per chunk size; kernels auto against off."""
    torch.manual_seed(0)
    side = 64 if quick else 224
    shape = (3, side, side)
    model = NormalizedModel(Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), shape), build_model("resnet50"))
    model = model.eval().to(device)
    family = DCTBlockSubspaces(shape, 16, 16)
    iterations = 2 if quick else 5
    for rows in chunk_sizes:
        samples = -(-rows // len(family))
        x = torch.rand(samples, *shape, device=device)
        grid = torch.arange(samples * len(family), device=device)[:rows]
        attack = SubspaceDeepFool(max_iter=iterations, batch_size=rows)
        prepared = attack.prepare(model, device)
        attack.attack_rows(prepared, x, family, grid // len(family), grid % len(family))  # warm-up (cuDNN plans)
        stats = attack.observer = PassStats(attack.batch_size)  # counts the timed call's passes
        synchronize(device)
        start = time.perf_counter()
        out = attack.attack_rows(prepared, x, family, grid // len(family), grid % len(family))
        synchronize(device)
        seconds = time.perf_counter() - start
        row_iterations = int(out.iterations.sum())
        print(f"[3] ResNet-50 {side}x{side}, {rows} rows per chunk, at most {iterations} iterations: "
              f"{rows / seconds:.1f} rows/s, {row_iterations / seconds:.1f} row-iterations/s, "
              f"fill {stats.fill:.2f}, {seconds:.2f} s")  # fmt: skip
    rows = chunk_sizes[0]
    samples = -(-rows // len(family))
    x = torch.rand(samples, *shape, device=device)
    timings, results = {}, {}
    for kernels in ("auto", "off"):
        attack = SubspaceDeepFool(max_iter=iterations, batch_size=rows, kernels=kernels)
        prepared = attack.prepare(model, device)
        attack(prepared, x, family)
        synchronize(device)
        start = time.perf_counter()
        results[kernels] = attack(prepared, x, family)
        synchronize(device)
        timings[kernels] = time.perf_counter() - start
    identical = torch.equal(results["auto"].margins, results["off"].margins)
    print(f"[4] kernels auto {timings['auto']:.2f} s, off {timings['off']:.2f} s on {device}; "
          f"margins bit-identical: {identical}")  # fmt: skip


def run(cmd: list[str], log: Path) -> tuple[int, float]:
    start = time.perf_counter()
    with log.open("w") as handle:
        code = subprocess.run(cmd, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT).returncode
    return code, time.perf_counter() - start


def check_training_and_evaluation(device: torch.device, quick: bool, tmp: Path) -> None:
    """5. and 6. A short `train.py fit` with the callback, then evaluate_margin.py on the device and on the CPU."""
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    steps, samples = (10, 5) if quick else (50, 20)
    fit = [sys.executable, "train.py", "fit", "--config", "configs/synthetic_lenet.yaml", "--trainer.max_steps",
           str(steps), "--trainer.accelerator", accelerator, "--trainer.devices", "1", "--trainer.default_root_dir",
           str(tmp / "runs"), "--trainer.enable_progress_bar", "false", "--data.num_train", "2000", "--data.num_test",
           "200", "--margin.rows.num_samples", str(samples), "--margin.progress", "false"]  # fmt: skip
    code, seconds = run(fit, tmp / "fit.log")
    folders = sorted((tmp / "runs").rglob("margins/epoch_*"))
    print(f"[5] train.py fit, {steps} steps on {accelerator}: exit {code}, {seconds:.1f} s, callback folders "
          f"{[f.name for f in folders]}" + ("" if code == 0 else f" (log: {tmp / 'fit.log'})"))  # fmt: skip
    checkpoint = next(iter(sorted((tmp / "runs").rglob("last.ckpt"))), None)
    if code != 0 or checkpoint is None:
        print((tmp / "fit.log").read_text()[-3000:])
        return
    from margins import read_report

    margins = {}
    for name in dict.fromkeys((accelerator, "cpu")):
        out = tmp / f"eval_{name}"
        cmd = [sys.executable, "evaluate_margin.py", "--checkpoint", str(checkpoint), "--num-samples", str(samples),
               "--accelerator", name, "--devices", "1", "--output-dir", str(out), "--no-progress"]  # fmt: skip
        code, seconds = run(cmd, tmp / f"eval_{name}.log")
        print(f"[6] evaluate_margin.py --accelerator {name} --devices 1: exit {code}, {seconds:.1f} s")
        if code == 0:
            margins[name] = read_report(out).margins
    if len(margins) == 2:
        rel = relative(torch.from_numpy(margins[accelerator]), torch.from_numpy(margins["cpu"]))
        print(f"[6] {accelerator} against cpu: relative difference median {rel.median():.2e}, max {rel.max():.2e}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a small run of every step)")
    parser.add_argument("--quick", action="store_true", help="small sizes (the tests' CPU run)")
    parser.add_argument("--chunk-rows", default="64,256,1024", help="ResNet-50 chunk sizes, comma-separated")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (run it on a GPU machine, or --device cpu for the CPU path)")
        return 0
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_check on {device} ({name}), torch {torch.__version__}")
    start = time.perf_counter()
    check_margins(device, args.quick)
    check_tf32(device)
    resnet50_rows(device, args.quick, [int(v) for v in args.chunk_rows.split(",")])
    with tempfile.TemporaryDirectory() as tmp:
        check_training_and_evaluation(device, args.quick, Path(tmp))
    print(f"done in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
