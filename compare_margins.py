"""Compare margin runs, or export one run's margins per sample as CSV.

Compare (the first run is the reference):

    python compare_margins.py RUN_DIR RUN_DIR [RUN_DIR...] [--names std flipped] [--output-dir outputs/compare]

writes to --output-dir: comparison.png (each run's median margin per subspace with its interquartile band, log
axis; stars where the paired Wilcoxon p < 0.01), row_ratios.png (for runs of the same samples: per subspace, the
median and interquartile range of the row-by-row ratio margin(run) / margin(first run) where both converged; e.g.
FMN against DeepFool), comparison.csv (one row per (subspace, run): median, q25, q75,
ratio to the reference's median, paired Wilcoxon signed-rank statistic and p-value vs the reference - only where
both runs hold the same samples, i.e. the same set of indices.npy; otherwise empty with a note), and prints a
per-subspace table. Runs must have the same number of subspaces.

A certified run (`--estimator certify`: lower bounds) with an attack's run (DeepFool or FMN: upper bounds) of the
same samples: every row's true margin lies in [certified lower bound, attack's margin]. For each such pair it
also prints, per subspace, the median certified bound, the median attack margin and their ratio (and the row-by-row
ratio), and writes interval.csv and interval.png (interval_<lower>_<upper>.png for more than one pair): the
paper's per-subspace plot of the attack's margins with the certified band under it.

    python compare_margins.py outputs/margins/RUN_certify outputs/margins/RUN --names certified deepfool

Export (per-sample CSV: sample_index, label, predicted, subspace, margin, converged, iterations, perturbed_label;
columns a folder lacks the files for are left empty):

    python compare_margins.py --export-csv RUN_DIR [RUN_DIR...]   # -> RUN_DIR/margins_per_sample.csv
    python compare_margins.py --export-csv RUN_DIR --output my.csv

RUN_DIR: a result folder of evaluate_margin.py, the margin callback or frequency_analysis.py (margins.npy,
converged.npy, indices.npy, summary.json). Bad input exits with status 2 and one line `error: ...`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from analysis.compare import (
    Run,
    compare_runs,
    interval_pairs,
    interval_rows,
    load_runs,
    plot_comparison,
    plot_interval,
    plot_row_ratios,
    write_csv,
    write_interval_csv,
)
from analysis.export import DEFAULT_NAME, export_per_sample_csv
from cli.parser import ArgumentParser
from common.errors import InputError
from margins.store.names import quantity
from plotting.margins import save_figure


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = ArgumentParser(prog="compare_margins.py", description=__doc__, formatter_class=raw)
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="margin result folders")
    parser.add_argument("--names", nargs="+", help="one label per run (default: folder names)")
    parser.add_argument("--output-dir", default="outputs/compare", help="where the comparison goes")
    parser.add_argument("--title", default="", help="figure title")
    parser.add_argument("--export-csv", action="store_true", help="export each run's per-sample CSV instead")
    parser.add_argument("--output", help="with --export-csv and one RUN_DIR: the CSV path")
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier comparison or CSV")
    return parser


def compare(args: argparse.Namespace) -> Path:
    if len(args.run_dirs) < 2:
        raise InputError("comparing needs at least two RUN_DIRs (or --export-csv for one)")
    runs = load_runs(args.run_dirs, args.names)
    rows = compare_runs(runs)
    out = Path(args.output_dir)
    refuse_overwrite(out / "comparison.csv", args.overwrite, "--output-dir")
    write_csv(rows, out / "comparison.csv")
    save_figure(plot_comparison(runs, rows, args.title), out / "comparison.png")
    ratios = plot_row_ratios(runs, rows, args.title)
    if ratios is not None:
        save_figure(ratios, out / "row_ratios.png")
    what = {run.name: quantity(run.estimator) for run in runs}
    for row in rows:
        p = "" if np.isnan(row["wilcoxon_p"]) else f"p={row['wilcoxon_p']:.2g}"
        by_row = "" if np.isnan(row["row_ratio_median"]) else (
            f"row ratio {row['row_ratio_median']:.3g} [{row['row_ratio_q25']:.3g}, {row['row_ratio_q75']:.3g}], "
            f"smaller on {100 * row['fraction_smaller']:.0f}%"
        )  # fmt: skip
        print(f"subspace {row['subspace']:3d} {row['run']:>20s} median {what[row['run']]} {row['median']:9.4g} "
              f"ratio {row['ratio_to_reference']:7.3g} {p} {by_row} {row['note']}")  # fmt: skip
    intervals(runs, out, args.title)
    print(f"results: {out.resolve()}")
    return out


def intervals(runs: list[Run], out: Path, title: str) -> None:
    """For every (certified run, attack run) pair of the same samples: the per-subspace table, interval.csv and
    the figure."""
    pairs = interval_pairs(runs)
    rows = []
    for lower, upper in pairs:
        mine = interval_rows(lower, upper)
        rows += mine
        name = "interval.png" if len(pairs) == 1 else f"interval_{lower.name}_{upper.name}.png"
        save_figure(plot_interval(lower, upper, title), out / name)
        attack = quantity(upper.estimator)
        print(f"interval per subspace: certified lower bound ({lower.name}) <= true margin <= {attack} ({upper.name})")
        print(f"subspace  median certified  median {attack}  ratio  row ratio [q25, q75]  certified above attack")
        for row in mine:
            print(f"{row['subspace']:8d}  {row['lower_median']:16.4g}  {row['upper_median']:{len(attack) + 7}.4g}  "
                  f"{row['median_ratio']:5.3g}  {row['row_ratio_median']:.3g} [{row['row_ratio_q25']:.3g}, "
                  f"{row['row_ratio_q75']:.3g}]  {row['lower_above_upper']} of {row['rows']} rows")  # fmt: skip
    if rows:
        write_interval_csv(rows, out / "interval.csv")


def export(args: argparse.Namespace) -> None:
    if args.output and len(args.run_dirs) != 1:
        raise InputError("--output takes one RUN_DIR; without it each CSV goes into its RUN_DIR")
    for run_dir in args.run_dirs:
        refuse_overwrite(Path(args.output or Path(run_dir) / DEFAULT_NAME), args.overwrite, "--output")
        print(export_per_sample_csv(run_dir, args.output))


def refuse_overwrite(path: Path, overwrite: bool, flag: str) -> None:
    if path.exists() and not overwrite:
        raise InputError(f"{path} exists; pass --overwrite to replace it or choose another {flag}")


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
        export(args) if args.export_csv else compare(args)
    except (InputError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
