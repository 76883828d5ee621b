"""The margin engine against the release's per-sample loop, its own floor, its kernels switched off one at a time,
foolbox, and (with --baseline) another checkout's engine, all in one run.

Lines per case (float32; CUDA when present):
- `release form`: the per-sample loop with the release's cost structure (`attacks.reference`, `release_cost=True`:
  one `.backward()` per candidate logit, parameter gradients included, dense bases): "x release" divides its time.
  `lean loop`: the same loop with input gradients only (the tests' reference): "x loop".
- `engine`: `SubspaceDeepFool()` (kernels "auto"); `kernels off`: the model as written; `-name`: every kernel but
  `name` (its own gain, the ablation of docs/ENGINE.md); `share_first_step off`, `refill off`: the two algorithmic
  ideas switched off.
- `floor`: the same model forward and input-gradient passes, at the same batch sizes as the engine's run (the
  `PassStats.passes` of an observer attached to it), run outside the engine on the plain model: what any batched
  implementation of the release's algorithm pays for its passes alone. "/floor" divides a line's time by it.
- `baseline (subprocess)` (--baseline DIR): the engine of the checkout DIR, timed in a fresh process
  (`benchmarks/engine_timer.py`) on the same model and inputs, beside `engine (subprocess)`, this checkout's engine
  timed the same way; the line says whether the two engines' margins are bit-equal. --subprocess-memory: fresh
  processes with `KeepFreedMemory` (glibc keeps freed memory) and with glibc's default malloc, to measure what
  keeping freed memory buys (ResNet-50's case).
Cases: LeNet briefly trained on real MNIST, 100 samples x 21 DCT subspaces (8x8, step 1); ResNet-18-MNIST
(BatchNorm, briefly trained) 20 x 21; full space, LeNet, 1000 samples (with foolbox's batched L2DeepFool when
installed); ResNet-50 at 224x224, random weights, 2 x 14 subspaces (16x16, step 16). Times are CPU seconds of the
process that ran them (`time.process_time`, robust to other processes sharing the cores; wall seconds on CUDA); the
variants of a case run round robin, in a new shuffled order each round, and the fastest run of each is shown. One
thread by default. `fill` = images per model pass / batch size. Margin differences are relative to the lean loop
(to the engine where there is no loop).

    python benchmarks/bench_deepfool.py [--quick] [--no-ablations] [--repeats 2] [--threads 1] [--device cpu]
        [--cases lenet,resnet18,full,resnet50] [--baseline ../old-checkout] [--subprocess-memory] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from attacks.common import precision_record  # noqa: E402
from attacks.deepfool import SubspaceDeepFool  # noqa: E402
from attacks.estimator import PassStats  # noqa: E402
from attacks.kernels import KERNELS  # noqa: E402
from attacks.reference import dct_block_basis, reference_margins  # noqa: E402
from frequency import DCTBlockSubspaces, FullSpace, SubspaceFamily  # noqa: E402
from models import Normalize, NormalizedModel, build_model  # noqa: E402

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class Timing:
    cpu: float  # CPU seconds (wall seconds on CUDA)
    wall: float
    margins: torch.Tensor | None = None
    iterations: torch.Tensor | None = None
    stats: PassStats | None = None


# ---- models and data ------------------------------------------------------------------------------------------
def mnist_tensors(data_dir: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """MNIST images [N, 1, 28, 28] in [0, 1] and labels [N] from the raw idx files, or None when absent."""
    from datamodules.mnist import read_mnist, resolve_mnist_root

    try:
        images, labels = read_mnist(resolve_mnist_root(data_dir), train)
    except (FileNotFoundError, RuntimeError):
        return None
    return images.unsqueeze(1).float() / 255.0, labels


def mnist_model(
    name: str, data_dir: Path, train_steps: int, device: torch.device, num_test: int = 1000
) -> tuple[torch.nn.Module, torch.Tensor]:
    """`name` ("lenet", "resnet18_mnist") after `train_steps` SGD steps on real MNIST (seed 0, batch 128, lr 0.05,
    momentum 0.9), and the first `num_test` test images (random images and an untrained model if MNIST is absent)."""
    torch.manual_seed(0)
    model = NormalizedModel(Normalize(MNIST_MEAN, MNIST_STD, (1, 28, 28)), build_model(name)).to(device)
    train, test = mnist_tensors(data_dir, True), mnist_tensors(data_dir, False)
    if train is None or test is None:
        print(f"MNIST not found under {data_dir}: random images and an untrained {name}")
        return model.eval(), torch.rand(num_test, 1, 28, 28, device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(train_steps):
        idx = torch.randint(0, len(train[0]), (128,))
        loss = torch.nn.functional.cross_entropy(model(train[0][idx].to(device)), train[1][idx].to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        images, labels = test[0][:num_test].to(device), test[1][:num_test].to(device)
        acc = (model(images).argmax(1) == labels).float().mean().item()
    print(f"{name} after {train_steps} SGD steps: test accuracy {acc:.3f} (first {num_test} test images)")
    return model, images


# ---- timed things ---------------------------------------------------------------------------------------------
def timed(fn: Callable[[], object], device: torch.device) -> tuple[object, float, float]:
    """`(fn(), seconds, wall_seconds)`: seconds are CPU seconds of this process, wall seconds on CUDA."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return out, (wall if device.type == "cuda" else cpu), wall


def engine_run(attack: SubspaceDeepFool, model, x, family, device) -> Timing:
    stats = attack.observer = PassStats(attack.batch_size)
    result, cpu, wall = timed(lambda: attack(model, x, family), device)
    return Timing(cpu, wall, result.margins, result.iterations, stats)


def floor_run(model: torch.nn.Module, x: torch.Tensor, passes: list[tuple[str, int]], candidates: int, device):
    """The passes of an engine run, replayed on the plain model: clean and check passes as no-grad forwards,
    gradient passes as a forward and `candidates - 1` input-gradient backward passes, on images of `x`."""

    def replay() -> None:
        for kind, size in passes:
            points = x[torch.arange(size, device=x.device) % x.shape[0]]
            if kind != "gradient":
                with torch.no_grad():
                    model(points)
                continue
            points = points.detach().requires_grad_(True)
            f = model(points)[:, :candidates]
            for k in range(1, candidates):
                torch.autograd.grad((f[:, k] - f[:, 0]).sum(), points, retain_graph=k < candidates - 1)

    _, cpu, wall = timed(replay, device)
    return Timing(cpu, wall)


def subprocess_run(repo: Path, case_file: Path, engine: dict, threads: int, keep_freed: bool) -> Timing:
    """One engine call of the checkout `repo` in a fresh process (`benchmarks/engine_timer.py`)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "margins.pt"
        timer = str(REPO / "benchmarks" / "engine_timer.py")
        cmd = [sys.executable, timer, "--repo", str(repo), "--case", str(case_file), "--engine", json.dumps(engine),
               "--out", str(out), "--threads", str(threads)]  # fmt: skip
        if keep_freed:
            cmd.append("--keep-freed-memory")
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=repo)
        if done.returncode:
            raise RuntimeError(f"engine_timer.py failed in {repo}:\n{done.stderr[-2000:]}")
        timing = json.loads(done.stdout.strip().splitlines()[-1])
        return Timing(timing["cpu"], timing["wall"], torch.load(out))


def dense_bases(family: SubspaceFamily, x: torch.Tensor) -> list[torch.Tensor | None]:
    """The release's dense basis [d, m] per subspace (None: full space)."""
    if not isinstance(family, DCTBlockSubspaces):
        return [None] * len(family)
    shape = tuple(x.shape[1:])
    return [dct_block_basis(shape, s * family.step, family.block).to(x) for s in range(len(family))]


# ---- one case -------------------------------------------------------------------------------------------------
def variants(ablations: bool, names: list[str] | None) -> dict[str, Callable[[], SubspaceDeepFool]]:
    """The in-process engine variants: defaults, kernels off, and (ablations) each kernel of `names` (None: all, and
    the two algorithmic ideas) switched off."""
    out: dict[str, Callable[[], SubspaceDeepFool]] = {
        "engine": SubspaceDeepFool,
        "kernels off": lambda: SubspaceDeepFool(kernels="off"),
    }
    if ablations:
        for name in names or KERNELS:
            out[f"-{name}"] = lambda name=name: SubspaceDeepFool(kernels=[k for k in KERNELS if k != name])
        for idea in ("share_first_step", "refill") if names is None else ():
            out[f"{idea} off"] = lambda idea=idea: _without(idea)
    return out


def _without(idea: str) -> SubspaceDeepFool:
    attack = SubspaceDeepFool()
    setattr(attack, idea, False)
    return attack


HEADER = (
    f"{'variant':34s} {'cpu s':>8s} {'wall s':>8s} {'rows/s':>9s} {'x rel.':>7s} {'x loop':>7s} {'/floor':>7s}"
    f" {'passes':>7s} {'fill':>5s}  vs reference"
)


def report(name: str, rows: int, run: Timing, loops: dict, floor: float | None, extra: str) -> None:
    ratios = " ".join(f"{loops[k] / run.cpu:7.1f}" if loops.get(k) else f"{'-':>7s}" for k in ("release", "loop"))
    per_floor = f"{run.cpu / floor:7.2f}" if floor else f"{'-':>7s}"
    stats = run.stats
    passes = f"{stats.gradient_passes + stats.check_passes:7d} {stats.fill:5.2f}" if stats else f"{'-':>7s} {'-':>5s}"
    line = f"{name:34s} {run.cpu:8.2f} {run.wall:8.2f} {rows / run.cpu:9.3g} {ratios} {per_floor} {passes}  {extra}"
    print(line, flush=True)


def compare(margins: torch.Tensor, iterations: torch.Tensor | None, ref: Timing) -> str:
    rel = (margins.double().cpu() - ref.margins.double().cpu()).abs() / ref.margins.double().cpu().clamp_min(1e-12)
    text = f"margin rel. diff median {rel.median():.1e} max {rel.max():.1e}"
    if iterations is not None and ref.iterations is not None:
        text += f", iterations equal {float((iterations.cpu() == ref.iterations.cpu()).float().mean()):.3f}"
    return text


def run_case(title: str, model, x, family, family_spec: list, args, with_loop: bool, ablations: list[str] | None):
    device, rows = torch.device(args.device), x.shape[0] * len(family)
    print(f"\n== {title}: {x.shape[0]} samples x {len(family)} subspaces = {rows} rows ==\n{HEADER}")
    loops, reference = {}, None
    if with_loop:
        bases = dense_bases(family, x)  # built once, outside both timings
        (margins, iterations), loops["loop"], wall = timed(lambda: reference_margins(model, x, bases), device)
        reference = Timing(loops["loop"], wall, margins, iterations)
        (release, _), loops["release"], release_wall = timed(lambda: reference_margins(model, x, bases, True), device)
        report("release form (per-sample loop)", rows, Timing(loops["release"], release_wall), loops, None,
               compare(release, None, reference))  # fmt: skip
        report("lean per-sample loop", rows, reference, loops, None, "reference")
    chosen = variants(not args.no_ablations and ablations != [], ablations)
    probe = SubspaceDeepFool()
    probe_stats = probe.observer = PassStats(probe.batch_size)
    probe(model, x, family)  # the engine's passes, replayed by the floor; warms caches for everybody
    plain = model.eval().requires_grad_(False)
    runners: dict[str, Callable[[], Timing]] = {
        name: (lambda make=make: engine_run(make(), model, x, family, device)) for name, make in chosen.items()
    }
    runners["floor"] = lambda: floor_run(plain, x, probe_stats.passes, probe.num_candidates, device)
    with tempfile.TemporaryDirectory() as tmp:
        case_file = Path(tmp) / "case.pt"
        torch.save({"model": model, "x": x, "family": family_spec}, case_file)
        for label, repo, keep in subprocess_variants(args):
            runners[label] = lambda repo=repo, keep=keep: subprocess_run(repo, case_file, {}, args.threads, keep)
        runs = round_robin(runners, args.repeats)
    floor = runs["floor"].cpu
    for name, run in runs.items():
        if reference is None and run.margins is not None:
            reference = run  # no loop: the other lines compare to the engine
            extra = "reference"
        else:
            extra = compare(run.margins, run.iterations, reference) if run.margins is not None else ""
        if name.startswith("baseline") and "engine (subprocess)" in runs:
            extra += f"; bit-equal to this engine: {torch.equal(run.margins, runs['engine (subprocess)'].margins)}"
        report(name, rows, run, loops, None if name == "floor" else floor, extra)
    return runs


def subprocess_variants(args) -> list[tuple[str, Path, bool]]:
    out = []
    if args.baseline:  # both engines in fresh processes, the same way
        out.append(("engine (subprocess)", REPO, args.subprocess_memory))
        out.append(("baseline (subprocess)", Path(args.baseline).resolve(), args.subprocess_memory))
    if args.subprocess_memory:  # with --baseline, kept memory is the setting of the two lines above
        out.append(("engine, glibc malloc (subprocess)", REPO, False))
        if not args.baseline:
            out.append(("engine, kept memory (subprocess)", REPO, True))
        else:
            out.append(("baseline, glibc malloc (subprocess)", Path(args.baseline).resolve(), False))
    return out


def round_robin(runners: dict[str, Callable[[], Timing]], repeats: int) -> dict[str, Timing]:
    """Every runner `repeats` times, in a new shuffled order each round; the fastest run of each."""
    runs: dict[str, list[Timing]] = {name: [] for name in runners}
    order, shuffle = list(runners), random.Random(0)
    for _ in range(repeats):
        shuffle.shuffle(order)
        for name in order:
            runs[name].append(runners[name]())
    return {name: min(timings, key=lambda t: t.cpu) for name, timings in runs.items()}


def run_foolbox(model: torch.nn.Module, x: torch.Tensor, device: torch.device, engine: Timing, labels) -> None:
    """foolbox's batched L2DeepFool with the release's settings (10 candidates, overshoot 0.02, 100 steps, logit
    loss). It clips to [0, 1] and runs every sample until all are adversarial, so margins differ slightly."""
    try:
        import foolbox as fb
    except ImportError:
        print("foolbox not installed (pip install foolbox): skipped")
        return
    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device=device)
    attack = fb.attacks.L2DeepFoolAttack(steps=100, candidates=10, overshoot=0.02, loss="logits")
    criterion = fb.criteria.Misclassification(labels)
    (_, clipped, success), cpu, wall = timed(lambda: attack(fmodel, x, criterion, epsilons=None), device)
    margins = (clipped - x).flatten(1).norm(dim=1)[None]
    extra = f"engine {cpu / engine.cpu:.1f}x faster; success {success.float().mean():.3f}; " + compare(
        margins, None, engine
    )
    report("foolbox L2DeepFoolAttack", x.shape[0], Timing(cpu, wall), {}, None, extra)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run of every case")
    parser.add_argument("--no-ablations", action="store_true", help="no kernel / idea ablation lines")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant; the fastest is shown")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: shared cores)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default="lenet,resnet18,full,resnet50", help="comma-separated subset")
    parser.add_argument("--baseline", help="another checkout whose engine is timed beside this one")
    parser.add_argument(
        "--subprocess-memory",
        action="store_true",
        help="also time the engine in fresh processes with glibc's malloc and with KeepFreedMemory",
    )
    parser.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--ablations", help="comma-separated kernels to switch off one at a time (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, cases = torch.device(args.device), set(args.cases.split(","))
    print(f"{precision_record(device, torch.float32)}, {torch.get_num_threads()} threads")
    mnist = DCTBlockSubspaces((1, 28, 28), block=8, step=1)
    mnist_spec = ["dct", (1, 28, 28), 8, 1]
    n_lenet, n_resnet, n_full = (20, 3, 200) if args.quick else (100, 20, 1000)
    if "lenet" in cases or "full" in cases:
        lenet, images = mnist_model("lenet", args.data_dir, 100 if args.quick else 300, device)
    if "lenet" in cases:
        run_case("LeNet / MNIST", lenet, images[:n_lenet], mnist, mnist_spec, args, True, None)
    if "resnet18" in cases:
        resnet, images18 = mnist_model("resnet18_mnist", args.data_dir, 20 if args.quick else 30, device)
        run_case("ResNet-18 / MNIST", resnet, images18[:n_resnet], mnist, mnist_spec, args, True, None)
    if "full" in cases:
        full, x = FullSpace((1, 28, 28)), images[:n_full]
        runs = run_case("full space, LeNet / MNIST", lenet, x, full, ["full", (1, 28, 28)], args, False, [])
        with torch.no_grad():
            labels = lenet(x).argmax(1)
        run_foolbox(lenet, x, device, runs["engine"], labels)
    if "resnet50" in cases:
        torch.manual_seed(0)
        norm = Normalize(IMAGENET_MEAN, IMAGENET_STD, (3, 224, 224))
        resnet50 = NormalizedModel(norm, build_model("resnet50")).to(device).eval()
        x = torch.rand(1 if args.quick else 2, 3, 224, 224, device=device)
        family = DCTBlockSubspaces((3, 224, 224), block=16, step=16)
        kernels = ["fold_batchnorm", "fast_maxpool", "pool_then_relu", "native_stem_grad", "channels_last_body"]
        args.repeats = 1 if not args.quick else args.repeats
        chosen = args.ablations.split(",") if args.ablations else kernels
        run_case("ResNet-50 random weights, 224x224", resnet50, x, family, ["dct", (3, 224, 224), 16, 16], args,
                 False, chosen)  # fmt: skip


if __name__ == "__main__":
    main()
