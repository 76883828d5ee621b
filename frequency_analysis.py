"""Frequency analyses of a trained model: 2-D margin maps, random-subspace controls, Fourier heat maps.

    # margins along K x K DCT blocks on a 2-D grid of the spectrum (default: the dataset's block, stride block/2;
    # MNIST: 8x8 blocks, stride 4, 6 x 6 = 36 subspaces) and the map of the median margin per block
    python frequency_analysis.py map2d --checkpoint last.ckpt --data-dir ../shared/data [--block 8 --stride 4]

    # the DCT family of the paper beside random orthonormal subspaces of the same dimension (seeded), or beside
    # user bases (--bases FILE.npy/.pt ...: [D, k], [S, D, k] or a list, checked for orthonormality)
    python frequency_analysis.py random --checkpoint last.ckpt [--count 21 --subspace-seed 0 --method auto]

    # Fourier heat map (Yin et al. 2019): error rate under x + r * eps * U(i, j) for every 2-D frequency
    python frequency_analysis.py heatmap --checkpoint last.ckpt --eps 10 [--num-samples 1000 --radius 15]

Samples: --num-samples test samples drawn with --seed (as evaluate_margin.py), or --indices FILE.npy. The model is
loaded with `evaluate_margin.load_model_and_data` (a Lightning checkpoint of this project). Everything runs in the
model's input space: for frequency-flipped data, the flipped representation (margins and heat map perturbations
alike; the heat map makes flipped inputs valid as flip(clamp(flip(z), 0, 1))).

Writes to --output-dir (default outputs/frequency_analysis/<command>_<dataset>[_<transform>]_<checkpoint>):
  map2d:   margins.npy [S, N], converged.npy, indices.npy, summary.json (settings), iterations.npy [S, N],
           labels.npy [N] (ground truth), predicted.npy [N], perturbed_labels.npy [S, N], map2d.npy [A, B] (median
           margin per block), map2d.png.
  random:  dct/ and random/ (or basis/): one such result folder per family, dct_vs_random.png, analysis.json
           (spread = max/min of the per-subspace medians of each family).
  heatmap: heatmap.npy [H, W] (error rate, unshifted FFT order), heatmap.json (eps, clean error, ...), heatmap.png.
Result folders work with `compare_margins.py` (comparison, per-sample CSV). Bad input: exit 2, `error: ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from analysis.fourier_heatmap import VALID_RANGES, FourierHeatmap, fourier_heatmap
from analysis.maps import median_map, spread_ratio
from analysis.plots import plot_dct_vs_random, plot_fourier_heatmaps, plot_margin_maps
from attacks.deepfool import SubspaceDeepFool
from common.cli import ArgumentParser
from common.errors import InputError
from frequency.families import build_subspace_family
from frequency.grid import DCTGridSubspaces
from frequency.subspaces import SubspaceFamily
from margins import gather_samples, measure_margins, save_figure, save_margin_report
from margins.inputs import choose_indices, load_model_and_data

DEFAULT_VALID = {"none": "box", "flip": "flipped_box"}  # other transforms (low/high pass) have no box: "none"


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = ArgumentParser(prog="frequency_analysis.py", description=__doc__, formatter_class=raw)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name, text in (("map2d", "2-D margin map"), ("random", "DCT vs random subspaces"), ("heatmap", "heat map")):
        sub = commands.add_parser(name, help=text)
        _common(sub, default_samples=1000 if name == "heatmap" else 100)
        if name == "map2d":
            sub.add_argument("--block", type=int, help="block side K (default: the dataset's, 8 on MNIST)")
            sub.add_argument("--stride", type=int, help="grid stride (default K // 2)")
        elif name == "random":
            sub.add_argument("--block", type=int, help="DCT block side (default: the dataset's)")
            sub.add_argument("--step", type=int, help="DCT block step (default: the dataset's)")
            sub.add_argument("--count", type=int, help="random subspaces (default: as many as DCT blocks)")
            sub.add_argument("--subspace-seed", type=int, default=0, help="seed of the random subspaces")
            sub.add_argument("--method", choices=("auto", "qr", "hartley"), default="auto", help="random generator")
            sub.add_argument("--bases", nargs="+", help="user bases (.npy/.pt) instead of random subspaces")
        else:
            sub.add_argument("--eps", type=float, required=True, help="L2 norm of the perturbation (MNIST LeNet: 10)")
            sub.add_argument("--radius", type=int, help="only frequencies with |i|, |j| <= radius (default all)")
            sub.add_argument("--valid", choices=VALID_RANGES, help="valid range (default: from the transform)")
    return parser


def _common(sub: argparse.ArgumentParser, default_samples: int) -> None:
    sub.add_argument("--checkpoint", required=True, help="Lightning checkpoint of this project")
    sub.add_argument("--data-dir", help="dataset directory (default: the checkpoint's)")
    sub.add_argument("--trusted-pickle", action="store_true", help="allow pickled objects (trusted files only)")
    sub.add_argument(
        "--num-samples", type=int, default=default_samples, help=f"test samples (default {default_samples})"
    )
    sub.add_argument("--seed", type=int, default=0, help="seed of the sample draw and of the heat map signs")
    sub.add_argument("--indices", help="FILE.npy of test-set indices (overrides the draw)")
    sub.add_argument("--device", help="torch device (default: cuda if available)")
    sub.add_argument("--batch-size", type=int, default=512, help="rows per chunk (DeepFool) / 4x images (heat map)")
    sub.add_argument("--max-iter", type=int, default=100, help="DeepFool iterations (default 100)")
    sub.add_argument("--overshoot", type=float, default=0.02, help="DeepFool overshoot (default 0.02)")
    sub.add_argument("--output-dir", help="where results go")
    sub.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---- Python API ----------------------------------------------------------------------------------------------
def measure_family(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    indices: np.ndarray,
    family: SubspaceFamily,
    attack: SubspaceDeepFool,
    output_dir: Path,
    settings: dict[str, Any],
    device: torch.device | str | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Margins of `x: [N, C, H, W]` along `family`, written as a result folder with the optional per-sample
    arrays (iterations, labels, predicted, perturbed labels); returns margins [S, N] float32."""
    run = measure_margins(model, x, family, attack, device=device, progress=progress)
    r = run.result
    settings = {**settings, "family": repr(family), "num_subspaces": len(family), "subspace_dims": family.dims}
    save_margin_report(output_dir, r.margins, r.converged, r.iterations, indices, r.labels, y, settings, run.seconds,
                       figure=not isinstance(family, DCTGridSubspaces))  # fmt: skip
    for name, value in (("iterations", r.iterations), ("labels", y), ("predicted", r.labels)):
        np.save(output_dir / f"{name}.npy", value.cpu().numpy().astype(np.int64))
    np.save(output_dir / "perturbed_labels.npy", r.perturbed_labels.cpu().numpy().astype(np.int64))
    return r.margins.cpu().numpy().astype(np.float32)


def margin_map(margins: np.ndarray, family: DCTGridSubspaces, output_dir: Path, title: str) -> np.ndarray:
    """Median-margin map [A, B]: map2d.npy and map2d.png in `output_dir`."""
    grid = median_map(margins, family)
    np.save(output_dir / "map2d.npy", grid)
    save_figure(plot_margin_maps({title: grid}, family), output_dir / "map2d.png")
    return grid


def heatmap_report(heat: FourierHeatmap, output_dir: Path, title: str, extra: dict[str, Any]) -> None:
    """heatmap.npy (unshifted), heatmap.json (settings + extra) and heatmap.png in `output_dir`."""
    output_dir.mkdir(parents=True, exist_ok=True)
    np.save(output_dir / "heatmap.npy", heat.error)
    (output_dir / "heatmap.json").write_text(json.dumps({**heat.settings(), **extra}, indent=2, default=str))
    save_figure(plot_fourier_heatmaps({title: heat}), output_dir / "heatmap.png")


# ---- command line --------------------------------------------------------------------------------------------
def resolve_device(name: str | None) -> torch.device:
    """`--device`: cuda when available by default; an unknown or unavailable device is an InputError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InputError(f"--device {name!r} is not a torch device (e.g. cpu, cuda, cuda:1)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name} requested but CUDA is not available; use --device cpu")
    return device


def load(args: argparse.Namespace) -> tuple[nn.Module, Any, torch.Tensor, torch.Tensor, np.ndarray, torch.device]:
    """Model, datamodule, samples x [N, C, H, W] and labels y [N], indices [N], device."""
    if args.batch_size < 1 or args.max_iter < 1 or not args.overshoot >= 0:
        raise InputError("--batch-size and --max-iter must be >= 1 and --overshoot >= 0")
    device = resolve_device(args.device)
    model, dm = load_model_and_data(args.checkpoint, args.data_dir, args.trusted_pickle)
    dataset = dm.margin_dataset()
    indices = choose_indices(args.num_samples, args.seed, args.indices, len(dataset), dm.name)
    x, y = gather_samples(dataset, indices)
    return model.to(device), dm, x, y, indices, device


def _settings(args: argparse.Namespace, dm: Any, argv: list[str]) -> dict[str, Any]:
    return {"source": "frequency_analysis", "command": ["frequency_analysis.py", *argv], "dataset": dm.name,
            "transform": dm.hparams.transform, "checkpoint": str(Path(args.checkpoint).resolve()), "seed": args.seed,
            "overshoot": args.overshoot, "max_iter": args.max_iter, "torch_version": torch.__version__}  # fmt: skip


def _title(dm: Any) -> str:
    return dm.name + ("" if dm.hparams.transform == "none" else f" ({dm.hparams.transform})")


def run(args: argparse.Namespace, argv: list[str]) -> Path:
    model, dm, x, y, indices, device = load(args)
    transform = "" if dm.hparams.transform == "none" else f"_{dm.hparams.transform}"
    default = Path("outputs/frequency_analysis") / f"{args.command}_{dm.name}{transform}_{Path(args.checkpoint).stem}"
    out = Path(args.output_dir or default)
    settings, progress = _settings(args, dm, argv), not args.no_progress
    attack = SubspaceDeepFool(overshoot=args.overshoot, max_iter=args.max_iter, batch_size=args.batch_size)
    start = time.perf_counter()
    if args.command == "map2d":
        block = args.block or dm.subspace_block
        family = build_subspace_family("grid", dm.image_shape, block, args.stride or max(1, block // 2))
        margins = measure_family(model, x, y, indices, family, attack, out, settings, device, progress)
        grid = margin_map(margins, family, out, f"{_title(dm)}: median margin per DCT block")
        print(f"2-D map {family.grid_shape}: median margin from {grid.min():.3g} to {grid.max():.3g}")
    elif args.command == "random":
        block, step = args.block or dm.subspace_block, args.step or dm.subspace_step
        dct = build_subspace_family("dct", dm.image_shape, block, step)
        kind = "basis" if args.bases else "random"
        control = build_subspace_family(kind, dm.image_shape, block, step, count=args.count, seed=args.subspace_seed,
                                        method=args.method, bases=args.bases)  # fmt: skip
        dct_margins = measure_family(model, x, y, indices, dct, attack, out / "dct", settings, device, progress)
        ctl_margins = measure_family(model, x, y, indices, control, attack, out / kind, settings, device, progress)
        spreads = {"dct": spread_ratio(dct_margins), kind: spread_ratio(ctl_margins)}
        (out / "analysis.json").write_text(json.dumps({"spread_max_over_min_median": spreads, **settings}, indent=2))
        fig = plot_dct_vs_random(
            {f"{_title(dm)}: DCT vs {kind} subspaces of dim {dct.dims[0]}": (dct_margins, ctl_margins)}
        )
        save_figure(fig, out / "dct_vs_random.png")
        print(f"max/min of per-subspace median margins: DCT {spreads['dct']:.3g}, {kind} {spreads[kind]:.3g}")
    else:
        valid = args.valid or DEFAULT_VALID.get(dm.hparams.transform, "none")
        heat = fourier_heatmap(model, x, y, args.eps, valid, args.seed, 4 * args.batch_size, args.radius)
        heatmap_report(heat, out, _title(dm), {**settings, "indices": indices.tolist()})
        print(f"heat map: error rate from {np.nanmin(heat.error):.3f} to {np.nanmax(heat.error):.3f} (eps {args.eps})")
    print(f"time: {time.perf_counter() - start:.1f} s on {device}; results: {out.resolve()}")
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        torch.manual_seed(args.seed)
        run(args, argv)
    except InputError as err:  # anything else is a bug: its traceback is shown
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
