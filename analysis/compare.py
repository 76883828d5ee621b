"""Compare margin runs: per-subspace medians, interquartile ranges, ratios and paired Wilcoxon tests.

Runs are result folders read with `margins.results.read_report` (margins [S, N], converged, indices [N]).
The first run is the reference: ratios are `median(run) / median(reference)` per subspace, and the paired
Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, two-sided, on all samples, converged or not, as the medians)
compares each run with the reference per subspace - only when both hold the SAME samples (the same set of dataset
indices; columns are aligned by index). Otherwise the p-value is empty and the row says why.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from scipy.stats import wilcoxon

from analysis.export import read_run
from common.errors import InputError

COLUMNS = (
    "subspace", "run", "median", "q25", "q75", "ratio_to_reference", "wilcoxon_statistic", "wilcoxon_p",
    "paired_samples", "not_converged", "note",
)  # fmt: skip


@dataclass
class Run:
    name: str
    margins: np.ndarray  # [S, N] float
    converged: np.ndarray  # [S, N] bool
    indices: np.ndarray  # [N] int64 dataset indices


def load_runs(run_dirs: list[str | Path], names: list[str] | None = None) -> list[Run]:
    """Read result folders; `names` default to the folder names. InputError on unreadable folders."""
    if names is not None and len(names) != len(run_dirs):
        raise InputError(f"{len(names)} names for {len(run_dirs)} runs; give one name per run")
    runs = []
    for i, path in enumerate(run_dirs):
        report = read_run(Path(path))
        name = names[i] if names else Path(path).resolve().name
        runs.append(Run(name, report.margins, report.converged, report.indices))
    shapes = {r.margins.shape[0] for r in runs}
    if len(shapes) > 1:
        raise InputError(f"runs have different numbers of subspaces {sorted(shapes)}; compare runs of one family")
    return runs


def paired_columns(reference: Run, run: Run) -> tuple[np.ndarray, np.ndarray] | None:
    """Column orders aligning both runs on shared dataset indices, or None when their sample sets differ."""
    if len(reference.indices) != len(run.indices) or set(reference.indices.tolist()) != set(run.indices.tolist()):
        return None
    return np.argsort(reference.indices), np.argsort(run.indices)


def compare_runs(runs: list[Run]) -> list[dict]:
    """One row per (subspace, run) with the `COLUMNS` fields (NaN / "" where not applicable)."""
    reference = runs[0]
    rows = []
    for s in range(reference.margins.shape[0]):
        ref_median = float(np.median(reference.margins[s]))
        for k, run in enumerate(runs):
            values = run.margins[s].astype(np.float64)
            q25, median, q75 = np.percentile(values, [25, 50, 75])
            row = dict(subspace=s, run=run.name, median=median, q25=q25, q75=q75)
            row["ratio_to_reference"] = median / ref_median
            row.update(wilcoxon_statistic=np.nan, wilcoxon_p=np.nan, paired_samples=0, note="reference")
            row["not_converged"] = int((~run.converged[s]).sum())
            if k > 0:
                row.update(_paired_test(reference, run, s))
            rows.append(row)
    return rows


def _paired_test(reference: Run, run: Run, s: int) -> dict:
    columns = paired_columns(reference, run)
    if columns is None:
        return {"note": f"samples differ from {reference.name} (indices.npy): no paired test"}
    a = reference.margins[s, columns[0]].astype(np.float64)
    b = run.margins[s, columns[1]].astype(np.float64)
    if np.all(a == b):
        return {"paired_samples": len(a), "note": "identical margins: no test"}
    result = wilcoxon(b, a)
    return {"wilcoxon_statistic": float(result.statistic), "wilcoxon_p": float(result.pvalue), "paired_samples": len(a),
            "note": f"paired Wilcoxon vs {reference.name}"}  # fmt: skip


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """The comparison rows as CSV (columns `COLUMNS`; NaN written empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()})
    return path


def plot_comparison(runs: list[Run], rows: list[dict], title: str = "") -> Figure:
    """Median margin per subspace with interquartile band for each run (log axis); subspaces whose paired
    Wilcoxon p-value vs the reference is below 0.01 get a star above the plot in that run's colour."""
    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(len(runs))]
    for color, run in zip(colors, runs):
        x = np.arange(run.margins.shape[0])
        q25, med, q75 = np.percentile(run.margins.astype(np.float64), [25, 50, 75], axis=1)
        ax.fill_between(x, q25, q75, color=color, alpha=0.2)
        ax.plot(x, med, ".-", color=color, label=f"{run.name} (median, interquartile band)")
    top = max(np.percentile(r.margins, 75, axis=1).max() for r in runs)
    for k, (color, run) in enumerate(zip(colors, runs)):
        significant = [r["subspace"] for r in rows if r["run"] == run.name and r["wilcoxon_p"] < 0.01]
        if k and significant:
            ax.plot(significant, [top * 1.3**k] * len(significant), "*", color=color, ms=6)
    ax.set_yscale("log")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("subspace index (DCT blocks: low -> high frequency)")
    ax.set_ylabel("margin (L2, input-space units)")
    ax.set_title(title or "Margins per subspace; * = paired Wilcoxon p < 0.01 vs the first run", fontsize="medium")
    ax.legend(fontsize="small", loc="best")
    return fig
