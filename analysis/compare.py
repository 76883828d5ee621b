"""Compare margin runs: per-subspace medians, interquartile ranges, ratios and paired Wilcoxon tests.

Runs are result folders read with `margins.store.results.read_report` (margins [S, N], converged, indices [N]).
The first run is the reference: ratios are `median(run) / median(reference)` per subspace, and the paired
Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, two-sided, on all samples, converged or not, as the medians)
compares each run with the reference per subspace - only when both hold the SAME samples (the same set of dataset
indices; columns are aligned by index). Otherwise the p-value is empty and the row says why. For paired runs the rows
are also compared one by one: the median and interquartile range of `margin(run) / margin(reference)` over the rows
where both converged, and the fraction of those where the run's margin is the smaller (e.g. a second estimator
against DeepFool on the same samples: `plot_row_ratios`).

A certified run (lower bounds, `--estimator certify`) beside an attack's run (upper bounds) of the same rows gives
each row an interval [certified lower bound, attack's margin] that holds the true margin: `interval_rows` per
subspace (medians of each side, their ratio, the row-by-row ratio) and `plot_interval` (the paper's per-subspace
plot with the certified band under the attack's curve).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import wilcoxon

from analysis.export import read_run
from common.errors import InputError
from margins.store.names import bound, estimator_of, quantity
from plotting.margins import describe_settings, frequency_axis, plain_log_axis

COLUMNS = (
    "subspace", "run", "median", "q25", "q75", "ratio_to_reference", "wilcoxon_statistic", "wilcoxon_p",
    "paired_samples", "not_converged", "row_ratio_median", "row_ratio_q25", "row_ratio_q75", "fraction_smaller",
    "both_converged", "note",
)  # fmt: skip
INTERVAL_COLUMNS = (
    "subspace", "lower_run", "upper_run", "lower_median", "upper_median", "median_ratio", "row_ratio_median",
    "row_ratio_q25", "row_ratio_q75", "rows", "lower_above_upper",
)  # fmt: skip


@dataclass
class Run:
    name: str
    margins: np.ndarray  # [S, N] float
    converged: np.ndarray  # [S, N] bool
    indices: np.ndarray  # [N] int64 dataset indices
    description: str = ""  # "lenet on mnist (transform flip)", from the folder's settings
    estimator: str = "deepfool"  # what measured it (`margins.store.names`): "deepfool", "fmn", "certify"

    @property
    def bound(self) -> str:
        """ "upper" (an attack's margins) or "lower" (certified lower bounds)."""
        return bound(self.estimator)


def load_runs(run_dirs: list[str | Path], names: list[str] | None = None) -> list[Run]:
    """Read result folders; `names` default to the folder names. InputError on unreadable folders."""
    if names is not None and len(names) != len(run_dirs):
        raise InputError(f"{len(names)} names for {len(run_dirs)} runs; give one name per run")
    runs = []
    for i, path in enumerate(run_dirs):
        report = read_run(Path(path))
        name = names[i] if names else Path(path).resolve().name
        described = describe_settings(report.settings)
        estimator = estimator_of(report.settings)
        runs.append(Run(name, report.margins, report.converged, report.indices, described, estimator))
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
            row.update(row_ratio_median=np.nan, row_ratio_q25=np.nan, row_ratio_q75=np.nan, fraction_smaller=np.nan)
            row["both_converged"] = 0
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
    out = _row_ratios(a, b, reference.converged[s, columns[0]] & run.converged[s, columns[1]])
    if np.all(a == b):
        return {**out, "paired_samples": len(a), "note": "identical margins: no test"}
    result = wilcoxon(b, a)
    return {**out, "wilcoxon_statistic": float(result.statistic), "wilcoxon_p": float(result.pvalue),
            "paired_samples": len(a), "note": f"paired Wilcoxon vs {reference.name}"}  # fmt: skip


def _row_ratios(reference: np.ndarray, run: np.ndarray, both: np.ndarray) -> dict:
    """Row-by-row ratios run / reference over the rows where both converged: median, quartiles, and the fraction
    where the run's margin is the smaller."""
    keep = both & (reference > 0)
    if not keep.any():
        return {"both_converged": 0}
    ratio = run[keep] / reference[keep]
    q25, median, q75 = np.percentile(ratio, [25, 50, 75])
    return {"row_ratio_median": float(median), "row_ratio_q25": float(q25), "row_ratio_q75": float(q75),
            "fraction_smaller": float((ratio < 1).mean()), "both_converged": int(keep.sum())}  # fmt: skip


def write_csv(rows: list[dict], path: str | Path, columns: tuple[str, ...] = COLUMNS) -> Path:
    """The comparison rows as CSV (columns `columns`, default `COLUMNS`; NaN written empty)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if isinstance(v, float) and np.isnan(v) else v for k, v in row.items()})
    return path


def plot_comparison(runs: list[Run], rows: list[dict], title: str = "", alpha: float = 0.01) -> Figure:
    """Median margin per subspace with interquartile band for each run (log axis), legend below the axes naming each
    run and its sample count. Where a paired Wilcoxon test ran (`rows`), subspaces with p < `alpha` vs the
    reference get a star above the data in that run's colour; the title says which test ran, or that none did."""
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    colors = [f"C{i}" for i in range(len(runs))]
    for color, run in zip(colors, runs):
        x = np.arange(run.margins.shape[0])
        q25, med, q75 = np.percentile(run.margins.astype(np.float64), [25, 50, 75], axis=1)
        ax.fill_between(x, q25, q75, color=color, alpha=0.2)
        described = f"{run.description}, " if run.description else ""
        label = f"{run.name}: {described}{quantity(run.estimator)}s, {run.margins.shape[1]} samples"
        ax.plot(x, med, ".-", color=color, label=label)
    top = max(np.percentile(r.margins, 75, axis=1).max() for r in runs)
    for k, (color, run) in enumerate(zip(colors, runs)):
        significant = [r["subspace"] for r in rows if r["run"] == run.name and r["wilcoxon_p"] < alpha]
        if k and significant:
            ax.plot(significant, [top * 1.3**k] * len(significant), "*", color=color, ms=6)
    plain_log_axis(ax)
    frequency_axis(ax, runs[0].margins.shape[0], "DCT subspace (frequency)")
    certified = any(run.bound == "lower" for run in runs)
    ax.set_ylabel("L2 norm (input-space units)" if certified else "margin (L2, input-space units)")
    what = "Median certified lower bound or margin" if certified else "Median margin"
    heading = [title] if title else []
    heading += [f"{what} per subspace, interquartile band", significance_line(runs, rows, alpha)]
    ax.set_title("\n".join(heading), fontsize="medium")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=min(len(runs), 2), fontsize="small")
    return fig


def significance_line(runs: list[Run], rows: list[dict], alpha: float = 0.01) -> str:
    """What the stars mean, or that no paired test ran (and why)."""
    tested = [r for r in rows if not np.isnan(r["wilcoxon_p"])]
    if tested:
        paired = max(r["paired_samples"] for r in tested)
        return f"* = paired Wilcoxon signed-rank p < {alpha:g} vs {runs[0].name} ({paired} paired samples)"
    reasons = sorted({r["note"].split(":")[0] for r in rows if r["run"] != runs[0].name})
    return "no paired test: " + "; ".join(reasons) if reasons else "no paired test: one run"


def plot_row_ratios(runs: list[Run], rows: list[dict], title: str = "") -> Figure | None:
    """Per subspace, the median and interquartile range of the row-by-row ratio margin(run) / margin(reference)
    over the rows where both converged (log axis, 1 marked), for each run paired with the reference; None when no
    run is."""
    paired = [run for run in runs[1:] if any(r["run"] == run.name and r["both_converged"] for r in rows)]
    if not paired:
        return None
    fig = Figure(figsize=(8, 4.6), layout="constrained")
    ax = fig.add_subplot()
    for k, run in enumerate(paired, start=1):
        mine = sorted((r for r in rows if r["run"] == run.name and r["both_converged"]), key=lambda r: r["subspace"])
        x = [r["subspace"] for r in mine]
        ax.fill_between(x, [r["row_ratio_q25"] for r in mine], [r["row_ratio_q75"] for r in mine], color=f"C{k}",
                        alpha=0.2)  # fmt: skip
        smaller = np.mean([r["fraction_smaller"] for r in mine])
        label = f"{run.name} / {runs[0].name} (smaller on {100 * smaller:.0f}% of the rows)"
        ax.plot(x, [r["row_ratio_median"] for r in mine], ".-", color=f"C{k}", label=label)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_yscale("log")
    plain_log_axis(ax)
    frequency_axis(ax, runs[0].margins.shape[0], "DCT subspace (frequency)")
    ax.set_ylabel("margin ratio, row by row")
    heading = [title] if title else []
    heading.append("Row-by-row margin ratio per subspace: median and interquartile band (rows where both converged)")
    ax.set_title("\n".join(heading), fontsize="medium")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", fontsize="small")
    return fig


def interval_pairs(runs: list[Run]) -> list[tuple[Run, Run]]:
    """Every (lower-bound run, upper-bound run) pair of the same samples, in the runs' order."""
    lower = [r for r in runs if r.bound == "lower"]
    upper = [r for r in runs if r.bound == "upper"]
    return [(lo, up) for lo in lower for up in upper if paired_columns(lo, up) is not None]


def interval_rows(lower: Run, upper: Run) -> list[dict]:
    """Per subspace of a certified run and an attack's run of the same samples: the median certified lower bound
    and the median attack margin (over all samples, as the paper's medians), their ratio, and row by row the
    median and quartiles of lower / upper over the rows where the attack changed the label (`rows` of them), and
    how many of those rows have a lower bound above the attack's margin (`lower_above_upper`: a certificate
    contradicted by a label change; 0 unless something is wrong)."""
    columns = paired_columns(lower, upper)
    if columns is None:
        raise InputError(f"{lower.name} and {upper.name} hold different samples (indices.npy): no interval")
    out = []
    for s in range(lower.margins.shape[0]):
        lo = lower.margins[s, columns[0]].astype(np.float64)
        up = upper.margins[s, columns[1]].astype(np.float64)
        rows = upper.converged[s, columns[1]] & (up > 0)
        lo_median, up_median = float(np.median(lo)), float(np.median(up))
        ratio = lo[rows] / up[rows]
        q25, median, q75 = np.percentile(ratio, [25, 50, 75]) if rows.any() else (np.nan,) * 3
        out.append({
            "subspace": s, "lower_run": lower.name, "upper_run": upper.name, "lower_median": lo_median,
            "upper_median": up_median, "median_ratio": lo_median / up_median if up_median > 0 else np.nan,
            "row_ratio_median": float(median), "row_ratio_q25": float(q25), "row_ratio_q75": float(q75),
            "rows": int(rows.sum()), "lower_above_upper": int((lo[rows] > up[rows]).sum()),
        })  # fmt: skip
    return out


def write_interval_csv(rows: list[dict], path: str | Path) -> Path:
    """The interval rows as CSV (columns `INTERVAL_COLUMNS`; NaN written empty)."""
    return write_csv(rows, path, INTERVAL_COLUMNS)


def plot_interval(lower: Run, upper: Run, title: str = "") -> Figure:
    """The paper's per-subspace plot of the attack's margins (every sample a dot, the median line, the
    interquartile band) with the certified band under it: from 0 to the median certified lower bound of each
    subspace (the radius within which no perturbation in the subspace changes the label, for half the samples),
    and the certified bounds' interquartile range. Linear axis from 0; the title states the median ratio range."""
    columns = paired_columns(lower, upper)
    if columns is None:
        raise InputError(f"{lower.name} and {upper.name} hold different samples (indices.npy): no interval")
    lo = lower.margins[:, columns[0]].astype(np.float64)
    up = upper.margins[:, columns[1]].astype(np.float64)
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(up.shape[0])
    jitter = 0.1 * np.random.default_rng(0).standard_normal(up.shape)
    attack, certified = quantity(upper.estimator), quantity(lower.estimator)
    ax.scatter((x[:, None] + jitter).ravel(), up.ravel(), s=5, alpha=0.3, color="tab:blue",
               label=f"{attack}s ({upper.name}), every sample")  # fmt: skip
    q25, median, q75 = np.percentile(up, [25, 50, 75], axis=1)
    ax.fill_between(x, q25, q75, color="tab:blue", alpha=0.15, lw=0, label=f"{attack}: interquartile range")
    ax.plot(x, median, ".-", color="black", lw=2, label=f"{attack}: median")
    lq25, lmedian, lq75 = np.percentile(lo, [25, 50, 75], axis=1)
    ax.fill_between(x, 0, lmedian, color="tab:green", alpha=0.35, lw=0,
                    label=f"certified band: 0 to the median {certified} ({lower.name})")  # fmt: skip
    ax.fill_between(x, lq25, lq75, color="tab:green", alpha=0.2, lw=0, hatch="//",
                    label=f"{certified}: interquartile range")  # fmt: skip
    ax.plot(x, lmedian, ".-", color="tab:green", lw=1.5)
    ax.set_ylim(bottom=0)
    frequency_axis(ax, up.shape[0], "DCT subspace (frequency)")
    ax.set_ylabel("L2 norm (input-space units)")
    ratio = lmedian / np.where(median > 0, median, np.nan)
    heading = [title] if title else []
    heading.append(f"{_capital(certified)} under the {attack}, per subspace, {up.shape[1]} samples")
    heading.append(f"median {certified} / median {attack}: {np.nanmin(ratio):.3g} to {np.nanmax(ratio):.3g}")
    ax.set_title("\n".join(heading), fontsize="medium")
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize="small")
    return fig


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]
