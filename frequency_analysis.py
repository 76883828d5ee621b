"""Frequency analyses of a trained model: 2-D margin maps, random-subspace controls, Fourier heat maps.

    # margins along K x K DCT blocks on a 2-D grid of the spectrum (default: the dataset's block, stride K/2;
    # MNIST: 8x8 blocks, stride 4, 6 x 6 = 36 subspaces) and the map of the median margin per block
    python frequency_analysis.py map2d --checkpoint last.ckpt --data-dir ../shared/data [--subspace-dim 8]

    # the DCT family of the paper beside random orthonormal subspaces of the same dimension (seeded), or beside
    # user bases (--bases FILE.npy/.pt ...: [D, k], [S, D, k] or a list, checked for orthonormality)
    python frequency_analysis.py random --checkpoint last.ckpt [--count 21 --subspace-seed 0 --method auto]

    # Fourier heat map (Yin et al. 2019): error rate under x + r * eps * U(i, j) for every 2-D frequency
    python frequency_analysis.py heatmap --checkpoint last.ckpt --eps 10 [--num-samples 1000 --radius 15]
    #   (--images-per-pass N: perturbed images per forward pass; --batch-size is its old, deprecated name)

map2d and random measure margins exactly as evaluate_margin.py does (the same flags, chunks, processes, resume and
result files: `--accelerator cpu --devices 2` or torchrun share the rows out, rerunning an interrupted command
resumes). The model and data come from any checkpoint evaluate_margin.py reads (--checkpoint, --model, --dataset,
...). Everything runs in the model's input space: for frequency-flipped data, the flipped representation (margins
and heat map perturbations alike; the heat map makes flipped inputs valid as flip(clamp(flip(z), 0, 1))).

Writes to --output-dir (default outputs/frequency_analysis/<command>/<model>_<dataset>[_<transform>]_<run>, and
`_<estimator>` after it for another estimator than DeepFool):
  map2d:   a result folder (margins.npy [S, N], converged.npy, iterations.npy, perturbed_labels.npy, indices.npy,
           predicted.npy, targets.npy, summary.json, chunks/) plus map2d.npy [A, B] (median margin per block) and
           map2d.png.
  random:  dct/ and random/ (or basis/): one result folder per family, dct_vs_random.png, analysis.json
           (spread = max/min of the per-subspace medians of each family).
  heatmap: heatmap.npy [H, W] (error rate, unshifted FFT order), heatmap.json (eps, clean error, ...), heatmap.png.
Result folders work with `compare_margins.py` (comparison, per-sample CSV). Rerunning an interrupted map2d or
random resumes it: a finished result folder of the same settings (random's DCT part) is reused, its missing chunks
and files are made. Each command's own files are written whole or not at all, its marker of a finished analysis
last (map2d.npy, analysis.json, heatmap.json). Bad input (a full disk included): exit 2, `error: ...`; stopped by a
signal: `stopped: ...`, exit 130 (SIGINT), 138 (SIGUSR1), 143 (SIGTERM), as evaluate_margin.py.
"""

# ruff: noqa: E402 - the stop signals are handled before the imports below, which take seconds
from __future__ import annotations

from common.stop import CommandExit, RunStopped, modules_loading

# a signal while the modules load: its exit code and line, not a bare kill
with modules_loading(__name__ == "__main__"):
    import argparse
    import dataclasses
    import gc
    import io
    import json
    import logging
    import sys
    import time
    import warnings
    from pathlib import Path
    from typing import Any

    import numpy as np
    import torch
    from matplotlib.figure import Figure

    from analysis.fourier_heatmap import IMAGES_PER_PASS, VALID_RANGES, FourierHeatmap, fourier_heatmap
    from analysis.maps import median_map, spread_ratio
    from analysis.plots import plot_dct_vs_random, plot_fourier_heatmaps, plot_margin_maps
    from cli.margin_flags import (
        add_attack_arguments,
        add_run_arguments,
        add_sample_arguments,
        add_source_arguments,
        add_subspace_arguments,
        attack_from_args,
        deprecated,
        input_error,
        rows_from_args,
        run_from_args,
        source_from_args,
    )
    from cli.parser import ArgumentParser
    from common.errors import InputError
    from frequency.grid import DCTGridSubspaces
    from margins.inputs import default_output_dir, gather_samples, load_source, margin_dataset
    from margins.run.evaluate import evaluate_margins
    from margins.settings import DEFAULT_NUM_SAMPLES, RowSettings
    from margins.store.chunks import atomic_write
    from margins.store.disk import disk_full, disk_full_error
    from margins.store.names import estimator_of, quantity
    from margins.store.results import MarginReport, time_line
    from plotting.margins import describe_run, describe_settings

DEFAULT_VALID = {"none": "box", "flip": "flipped_box"}  # other transforms (low/high pass) have no box: "none"
OUTPUT_ROOT = "outputs/frequency_analysis"
HEATMAP_SAMPLES = 1000  # heatmap's --num-samples default (map2d and random: the margins' DEFAULT_NUM_SAMPLES)


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = ArgumentParser(prog="frequency_analysis.py", description=__doc__, formatter_class=raw)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for name, text in (("map2d", "2-D margin map"), ("random", "DCT vs random subspaces"), ("heatmap", "heat map")):
        sub = commands.add_parser(name, help=text, description=text)
        add_source_arguments(sub)
        add_sample_arguments(sub, HEATMAP_SAMPLES if name == "heatmap" else DEFAULT_NUM_SAMPLES)
        if name == "heatmap":
            _heatmap_arguments(sub)
            continue
        add_subspace_arguments(sub, "grid stride (default: k // 2)" if name == "map2d" else "DCT block step")
        add_attack_arguments(sub)
        add_run_arguments(sub, f"{OUTPUT_ROOT}/{name}/<model>_<dataset>_<transform>_<run>")
        _aliases(sub, name)
        if name == "random":
            sub.add_argument("--count", type=int, help="random subspaces (default: as many as DCT blocks)")
            sub.add_argument("--subspace-seed", type=int, default=0, help="seed of the random subspaces")
            sub.add_argument("--method", choices=("auto", "qr", "hartley"), default="auto", help="random generator")
            sub.add_argument("--bases", nargs="+", help="user bases (.npy/.pt) instead of random subspaces")
    return parser


def _heatmap_arguments(sub: argparse.ArgumentParser) -> None:
    a = sub.add_argument
    a("--eps", type=float, required=True, help="L2 norm of the perturbation (MNIST LeNet: 10)")
    a("--radius", type=int, help="only frequencies with |i|, |j| <= radius (default all)")
    a("--valid", choices=VALID_RANGES, help="valid range (default: from the transform)")
    a("--images-per-pass", type=int, default=IMAGES_PER_PASS,
      help=f"perturbed images per forward pass (default {IMAGES_PER_PASS})")  # fmt: skip
    a("--batch-size", dest="images_per_pass", type=int, action=deprecated("--images-per-pass", int),
      help=argparse.SUPPRESS)  # fmt: skip
    a("--accelerator", default="auto", help="cpu, gpu or auto (default: gpu when available); one device")
    a("--device", dest="accelerator", action=deprecated("--accelerator"), help=argparse.SUPPRESS)
    a("--output-dir", help=f"where results go (default {OUTPUT_ROOT}/heatmap/<model>_<dataset>_<transform>_<run>)")
    a("--overwrite", action="store_true", help="replace an earlier heat map in --output-dir")
    a("--no-progress", action="store_true", help="no progress bar")


def _aliases(sub: argparse.ArgumentParser, name: str) -> None:
    """The flag names of earlier versions, each with a deprecation line."""
    a, hidden = sub.add_argument, argparse.SUPPRESS
    a("--block", dest="subspace_dim", type=int, action=deprecated("--subspace-dim", int), help=hidden)
    step = "--stride" if name == "map2d" else "--step"
    a(step, dest="subspace_step", type=int, action=deprecated("--subspace-step", int), help=hidden)
    a("--batch-size", dest="chunk_rows", type=int, action=deprecated("--chunk-rows", int), help=hidden)
    a("--device", dest="accelerator", action=deprecated("--accelerator/--devices", _accelerator), help=hidden)


def _accelerator(device: str) -> str:
    """The accelerator of an old `--device` value: cpu, cuda, cuda:N -> cpu or gpu."""
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise InputError(f"--device {device!r}: use --accelerator cpu or --accelerator gpu (--devices N)")
    return "gpu" if device.startswith("cuda") else "cpu"


# ---- commands ------------------------------------------------------------------------------------------------
def margins_of(
    args: argparse.Namespace, argv: list[str], rows: RowSettings, folder: Path | None
) -> tuple[MarginReport | None, Path]:
    """evaluate_margins with the command's flags on `rows`, into `folder` (None: a folder named
    after the model and run under outputs/frequency_analysis/<command>/); a finished folder of these settings is
    reused (`extra["reused"]`): the command resumes after it."""
    return evaluate_margins(
        source_from_args(args), rows=rows, attack=attack_from_args(args), run=run_from_args(args),
        output_dir=folder, output_root=f"{OUTPUT_ROOT}/{args.command}", command=["frequency_analysis.py", *argv],
        reuse_finished=True,
    )  # fmt: skip


def refuse_finished(folder: Path, marker: str) -> None:
    """InputError when `folder` holds a finished analysis (its `marker` file), as for a finished evaluation."""
    if (folder / marker).is_file():
        raise InputError(
            f"{folder.resolve()} already holds a finished evaluation ({marker}); overwrite it (--overwrite) or "
            "choose another output folder"
        )


def save_files(folder: Path, contents: dict[str, bytes]) -> None:
    """Write each file whole (atomically) into `folder`, in the given order (the marker of a finished analysis
    last); a full disk is the one-line InputError naming the folder and the space these files need."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in contents.items():
            atomic_write(folder / name, data)
    except OSError as err:
        if disk_full(err):
            raise disk_full_error(folder, sum(len(data) for data in contents.values())) from err
        raise


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def png_bytes(figure: Figure, dpi: int = 150) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def run_map2d(args: argparse.Namespace, argv: list[str]) -> Path | None:
    folder = Path(args.output_dir) if args.output_dir else None
    report, folder = margins_of(args, argv, rows_from_args(args, "grid"), folder)
    if report is None:  # ranks > 0: rank 0 reports
        return None
    if report.extra.get("reused"):
        refuse_finished(folder, "map2d.npy")
    s = report.settings
    family = DCTGridSubspaces(tuple(s["model"]["image_shape"]), s["subspace_dim"], s["subspace_step"])
    grid = median_map(report.margins, family)
    what = quantity(estimator_of(s))
    figure = plot_margin_maps({describe_settings(s): grid}, family, num_samples=report.margins.shape[1], quantity=what)
    save_files(folder, {"map2d.png": png_bytes(figure), "map2d.npy": npy_bytes(grid)})
    print(f"2-D map {family.grid_shape}: median {what} from {np.nanmin(grid):.3g} to {np.nanmax(grid):.3g}")
    print(time_line(report))
    return folder


def run_random(args: argparse.Namespace, argv: list[str]) -> Path | None:
    loaded = load_source(source_from_args(args))
    default = attack_from_args(args).default_folder(_default_folder(args, "random", loaded))
    out = Path(args.output_dir) if args.output_dir else default
    if not args.overwrite:
        refuse_finished(out, "analysis.json")
    kind = "basis" if args.bases else "random"
    given = rows_from_args(args, kind)
    dct_rows = dataclasses.replace(given, subspace="dct", count=None, bases=())
    control = dataclasses.replace(given, subspace_dim=None, subspace_step=None) if args.bases else given
    control.family(loaded.datamodule)  # bad --count, --bases, ...: an error before the DCT family is measured
    dct, _ = margins_of(args, argv, dct_rows, out / "dct")
    ctl, _ = margins_of(args, argv, control, out / kind)
    if dct is None or ctl is None:  # ranks > 0: rank 0 reports
        return None
    spreads = {"dct": spread_ratio(dct.margins), kind: spread_ratio(ctl.margins)}
    analysis = {"spread_max_over_min_median": spreads, "command": ["frequency_analysis.py", *argv]}
    dim, what = dct.settings["subspace_size"], quantity(estimator_of(dct.settings))
    figure = plot_dct_vs_random(
        {f"{describe_settings(dct.settings)}: {what}s": (dct.margins, ctl.margins)},
        f"DCT blocks vs {kind} subspaces of dimension {dim}",
        quantity=what,
    )
    analysis_text = (json.dumps(analysis, indent=2) + "\n").encode()
    save_files(out, {"dct_vs_random.png": png_bytes(figure), "analysis.json": analysis_text})
    print(f"max/min of per-subspace median {what}s: DCT {spreads['dct']:.3g}, {kind} {spreads[kind]:.3g}")
    print(time_line(dct, ctl))
    return out


def run_heatmap(args: argparse.Namespace, argv: list[str]) -> Path:
    start = time.perf_counter()
    device = _heatmap_device(args.accelerator)
    loaded = load_source(source_from_args(args))
    dm = loaded.datamodule
    out = Path(args.output_dir) if args.output_dir else _default_folder(args, "heatmap", loaded)
    if (out / "heatmap.json").is_file() and not args.overwrite:
        raise InputError(f"{out} already holds a heat map; pass --overwrite or choose another --output-dir")
    dataset = margin_dataset(dm, args.data_dir is None, "frequency_analysis.py")
    indices = rows_from_args(args).indices(len(dataset), dm.name)
    x, y = gather_samples(dataset, indices)
    valid = args.valid or DEFAULT_VALID.get(dm.hparams.transform, "none")
    model = loaded.model.to(device)
    heat = fourier_heatmap(model, x, y, args.eps, valid, args.seed, args.images_per_pass, args.radius,
                           progress=not args.no_progress)  # fmt: skip
    settings = {"command": ["frequency_analysis.py", *argv], "dataset": dm.name, "transform": dm.hparams.transform,
                "checkpoint": str(Path(args.checkpoint).resolve()), "checkpoint_sha256": loaded.sha256,
                "seed": args.seed, "num_samples": len(indices), "indices": indices.tolist(), "device": str(device),
                "torch_version": torch.__version__}  # fmt: skip
    title = describe_run(loaded.hparams["net"], dm.name, dm.hparams.transform)
    _heatmap_report(heat, out, title, settings)
    print(f"heat map: error rate from {np.nanmin(heat.error):.3f} to {np.nanmax(heat.error):.3f} (eps {args.eps})")
    print(f"time: {time.perf_counter() - start:.1f} s ({device})")
    return out


def _heatmap_report(heat: FourierHeatmap, output_dir: Path, title: str, extra: dict[str, Any]) -> None:
    """heatmap.npy (unshifted), heatmap.png and heatmap.json (settings + extra; written last) in `output_dir`."""
    settings = json.dumps({**heat.settings(), **extra}, indent=2, default=str).encode()
    figure = png_bytes(plot_fourier_heatmaps({title: heat}))
    save_files(output_dir, {"heatmap.npy": npy_bytes(heat.error), "heatmap.png": figure, "heatmap.json": settings})


def _heatmap_device(accelerator: str) -> torch.device:
    """The heat map's one device: cpu, or the first GPU (gpu/cuda; auto when CUDA is available)."""
    name = accelerator.lower()
    if name in ("gpu", "cuda") or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InputError(f"--accelerator {accelerator} requested but CUDA is not available; use cpu")
        return torch.device("cuda", 0)
    if name in ("cpu", "auto"):
        return torch.device("cpu")
    raise InputError(f"--accelerator {accelerator!r}: the heat map runs on cpu or gpu")


def _default_folder(args: argparse.Namespace, command: str, loaded=None) -> Path:
    """outputs/frequency_analysis/<command>/<model>_<dataset>[_<transform>]_<run>."""
    loaded = loaded or load_source(source_from_args(args))
    return default_output_dir(
        loaded.hparams["net"], loaded.datamodule, loaded.info.path, root=f"{OUTPUT_ROOT}/{command}"
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (as evaluate_margin.py's). Other errors propagate."""
    argv = list(sys.argv[1:] if argv is None else argv)
    warnings.filterwarnings("ignore", message=r".*(LeafSpec|does not have many workers).*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    with CommandExit() as command:
        try:
            args = build_parser().parse_args(argv)
            torch.manual_seed(args.seed)
            out = {"map2d": run_map2d, "random": run_random, "heatmap": run_heatmap}[args.command](args, argv)
            if out is not None:  # rank 0 (ranks > 0 of map2d / random return None)
                print(f"results: {out.resolve()}")
        except InputError as err:  # anything else is a bug: its traceback is shown
            return input_error(err)
        except RunStopped as stop:
            return command.stopped(stop)
    return 0


if __name__ == "__main__":
    status = main()
    gc.freeze()  # the process ends: what it built is not collected on the way out (seconds on a busy machine)
    sys.exit(status)
