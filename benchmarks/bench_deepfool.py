"""The margin engine against the release's per-sample loop, the same passes on the model as written, a FLOP bound,
its kernels switched off one at a time, foolbox, and (with --baseline) another checkout's engine, all in one run.

Lines per case (float32; CUDA when present):
- `release form`: the per-sample loop with the release's cost structure (`attacks.reference`, `release_cost=True`:
  one `.backward()` per candidate logit, parameter gradients included, dense bases): "x release" divides its time.
  `lean loop`: the same loop with input gradients only (the tests' reference): "x loop".
- `engine`: `SubspaceDeepFool()` (kernels "auto"); `kernels off`: the model as written; `-name`: every kernel but
  `name` (its own gain, the ablation of docs/ENGINE.md); `share_first_step off`, `refill off`: the two algorithmic
  ideas switched off.
- `plain passes`: the same model forward and input-gradient passes, at the same batch sizes as the engine's run (the
  `PassStats.passes` of an observer attached to it), run outside the engine on the model as written: what a batched
  implementation of the release's algorithm pays for its passes without the engine's kernels. "/plain" divides a
  line's time by it (below 1: the kernels make the passes cheaper than the model as written; it is not a lower bound).
- `FLOP bound`: a true lower bound, the fewer of the FLOPs counted (matmuls and convolutions, forward and backward,
  `torch.utils.flop_counter`'s formulas) in the engine's run and in the plain passes, at the peak rate measured on
  this machine (the best of 5 float32 1024x1024 matmuls at the same thread count, per CPU second): no run of these
  passes can take less. "/bound" divides a line's time by it.
- `baseline (subprocess)` (--baseline DIR): the engine of the checkout DIR, timed in a fresh process
  (`benchmarks/engine_timer.py`) on the same model and inputs, beside `engine (subprocess)`, this checkout's engine
  timed the same way; the line says whether the two engines' margins are bit-equal. --subprocess-memory: fresh
  processes with `KeepFreedMemory` (glibc keeps freed memory) and with glibc's default malloc, to measure what
  keeping freed memory buys (ResNet-50's case).
Cases: LeNet briefly trained on real MNIST, 100 samples x 21 DCT subspaces (8x8, step 1); ResNet-18-MNIST
(BatchNorm, briefly trained) 20 x 21; full space, LeNet, 1000 samples; ResNet-50 at 224x224, random weights, 2 x 14
subspaces (16x16, step 16). In full space, with foolbox installed (`pip install foolbox`: not a requirement of this
project; its lines are skipped, saying so, without it), foolbox's batched `L2DeepFoolAttack` with the release's
settings runs in the same round robin at the same thread count: `foolbox, no box` solves the engine's problem
(bounds (-inf, inf): no clipping), `foolbox, [0, 1] box` another, harder one (every iterate clipped to valid pixels,
so it iterates longer); only the first compares like with like. Times are CPU seconds of the process that ran them
(`time.process_time`, robust to other processes sharing the cores; wall seconds on CUDA); the variants of a case run
round robin, in a new shuffled order each round, and the fastest run of each is shown. One thread by default
(`--threads N`: every line with N). `fill` = images per model pass / batch size. Margin differences are relative to
the lean loop (to the engine where there is no loop).

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
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

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


class FlopCount(TorchDispatchMode):
    """FLOPs of the matmuls and convolutions (forward and backward) dispatched inside the block, by
    `torch.utils.flop_counter`'s formulas. (`FlopCounterMode` itself hooks modules, which `autograd.grad` on a
    leaf rejects.)"""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += formula(*args, **kwargs, out_val=out)
        return out


def counted_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one untimed call of `fn`."""
    with FlopCount() as count:
        fn()
    return count.flops


def peak_flops(device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """The machine's measured peak: FLOPs per second (per CPU second on CPU) of the best of `repeats` float32
    `size` x `size` matmuls at the current thread count."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b  # warm-up
    best = min(timed(lambda: a @ b, device)[1] for _ in range(repeats))
    return 2 * size**3 / best


@dataclass
class Timing:
    cpu: float  # CPU seconds (wall seconds on CUDA)
    wall: float
    margins: torch.Tensor | None = None
    iterations: torch.Tensor | None = None
    stats: PassStats | None = None
    note: str = ""


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


def plain_passes(model: torch.nn.Module, x: torch.Tensor, passes: list[tuple[str, int]], candidates: int):
    """The passes of an engine run, replayed on the model as written: clean and check passes as no-grad forwards,
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

    return replay


def plain_run(replay: Callable[[], None], device: torch.device) -> Timing:
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
    f"{'variant':34s} {'cpu s':>8s} {'wall s':>8s} {'rows/s':>9s} {'x rel.':>7s} {'x loop':>7s} {'/plain':>7s}"
    f" {'/bound':>7s} {'passes':>7s} {'fill':>5s}  vs reference"
)


def report(name: str, rows: int, run: Timing, loops: dict, plain: float | None, bound: float | None, extra: str):
    ratios = " ".join(f"{loops[k] / run.cpu:7.1f}" if loops.get(k) else f"{'-':>7s}" for k in ("release", "loop"))
    per = " ".join(f"{run.cpu / ref:7.2f}" if ref else f"{'-':>7s}" for ref in (plain, bound))
    stats = run.stats
    passes = f"{stats.gradient_passes + stats.check_passes:7d} {stats.fill:5.2f}" if stats else f"{'-':>7s} {'-':>5s}"
    line = f"{name:34s} {run.cpu:8.2f} {run.wall:8.2f} {rows / run.cpu:9.3g} {ratios} {per} {passes}  {extra}"
    print(line, flush=True)


def compare(margins: torch.Tensor, iterations: torch.Tensor | None, ref: Timing) -> str:
    rel = (margins.double().cpu() - ref.margins.double().cpu()).abs() / ref.margins.double().cpu().clamp_min(1e-12)
    text = f"margin rel. diff median {rel.median():.1e} max {rel.max():.1e}"
    if iterations is not None and ref.iterations is not None:
        text += f", iterations equal {float((iterations.cpu() == ref.iterations.cpu()).float().mean()):.3f}"
    return text


def run_case(title: str, model, x, family, family_spec: list, args, with_loop: bool, ablations: list[str] | None,
             others: dict[str, Callable[[], Timing]] | None = None):  # fmt: skip
    device, rows = torch.device(args.device), x.shape[0] * len(family)
    print(f"\n== {title}: {x.shape[0]} samples x {len(family)} subspaces = {rows} rows ==\n{HEADER}")
    loops, reference = {}, None
    if with_loop:
        bases = dense_bases(family, x)  # built once, outside both timings
        (margins, iterations), loops["loop"], wall = timed(lambda: reference_margins(model, x, bases), device)
        reference = Timing(loops["loop"], wall, margins, iterations)
        (release, _), loops["release"], release_wall = timed(lambda: reference_margins(model, x, bases, True), device)
        report("release form (per-sample loop)", rows, Timing(loops["release"], release_wall), loops, None, None,
               compare(release, None, reference))  # fmt: skip
        report("lean per-sample loop", rows, reference, loops, None, None, "reference")
    chosen = variants(not args.no_ablations and ablations != [], ablations)
    probe = SubspaceDeepFool()
    probe_stats = probe.observer = PassStats(probe.batch_size)
    probe(model, x, family)  # the engine's passes, replayed on the plain model; warms caches for everybody
    plain = model.eval().requires_grad_(False)
    replay = plain_passes(plain, x, probe_stats.passes, probe.num_candidates)
    engine_flops = counted_flops(lambda: SubspaceDeepFool()(model, x, family))
    plain_flops, peak = counted_flops(replay), peak_flops(device)
    bound = min(engine_flops, plain_flops) / peak
    threads = torch.get_num_threads()
    print(f"FLOPs (matmuls, convolutions): engine {engine_flops / 1e9:.2f} G, plain passes {plain_flops / 1e9:.2f} "
          f"G; measured peak {peak / 1e9:.1f} GFLOP/s ({threads} threads): FLOP bound {bound:.3f} s")  # fmt: skip
    runners: dict[str, Callable[[], Timing]] = {
        name: (lambda make=make: engine_run(make(), model, x, family, device)) for name, make in chosen.items()
    }
    runners["plain passes"] = lambda: plain_run(replay, device)
    runners.update(others or {})
    with tempfile.TemporaryDirectory() as tmp:
        case_file = Path(tmp) / "case.pt"
        torch.save({"model": model, "x": x, "family": family_spec}, case_file)
        for label, repo, keep in subprocess_variants(args):
            runners[label] = lambda repo=repo, keep=keep: subprocess_run(repo, case_file, {}, args.threads, keep)
        runs = round_robin(runners, args.repeats)
    plain_cpu = runs["plain passes"].cpu
    for name, run in runs.items():
        if reference is None and run.margins is not None:
            reference = run  # no loop: the other lines compare to the engine
            extra = "reference"
        else:
            extra = compare(run.margins, run.iterations, reference) if run.margins is not None else ""
        if name.startswith("baseline") and "engine (subprocess)" in runs:
            extra += f"; bit-equal to this engine: {torch.equal(run.margins, runs['engine (subprocess)'].margins)}"
        if name.startswith("foolbox"):
            extra = f"{run.cpu / runs['engine'].cpu:.1f}x the engine's time; {run.note}; {extra}"
        report(name, rows, run, loops, None if name == "plain passes" else plain_cpu, bound, extra)
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


def foolbox_runners(model: torch.nn.Module, x: torch.Tensor, labels: torch.Tensor) -> dict[str, Callable[[], Timing]]:
    """foolbox's batched L2DeepFool with the release's settings (10 candidates, overshoot 0.02, 100 steps, logit
    loss) on the engine's problem (no box) and, as another problem, with pixels clipped to [0, 1]; {} (with a line
    saying so) when foolbox is not installed. It runs every sample until all are adversarial."""
    try:
        import foolbox as fb
    except ImportError:
        print("foolbox not installed (pip install foolbox; not a requirement of this project): its lines skipped")
        return {}
    attack = fb.attacks.L2DeepFoolAttack(steps=100, candidates=10, overshoot=0.02, loss="logits")
    criterion = fb.criteria.Misclassification(labels)

    def runner(bounds: tuple[float, float]) -> Callable[[], Timing]:
        fmodel = fb.PyTorchModel(model, bounds=bounds, device=x.device)

        def run() -> Timing:
            (_, adversarial, success), cpu, wall = timed(lambda: attack(fmodel, x, criterion, epsilons=None), x.device)
            margins = (adversarial - x).flatten(1).norm(dim=1)[None]
            return Timing(cpu, wall, margins, note=f"success {success.float().mean():.3f}")

        return run

    inf = float("inf")
    return {"foolbox, no box (same problem)": runner((-inf, inf)), "foolbox, [0, 1] box (another)": runner((0, 1))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes, a smoke run of every case")
    parser.add_argument("--no-ablations", action="store_true", help="no kernel / idea ablation lines")
    parser.add_argument("--repeats", type=int, default=2, help="runs per variant; the fastest is shown")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of every line, foolbox's included (default 1)")  # fmt: skip
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
        with torch.no_grad():
            labels = lenet(x).argmax(1)
        run_case("full space, LeNet / MNIST", lenet, x, full, ["full", (1, 28, 28)], args, False, [],
                 foolbox_runners(lenet, x, labels))  # fmt: skip
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
