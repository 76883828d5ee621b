"""How tight are DeepFool's margins? The same rows measured with a second, minimum-norm estimator (FMN, attacks/fmn.py)
on the MNIST LeNets of docs/RESULTS.md, and the paper's claims checked again with it.

    python scripts/estimator_study.py [--reproduction outputs/reproduce_mnist] [--num-samples 100] [--docs]

Takes the standard, flipped, PGD-trained and flipped PGD-trained LeNets trained by `scripts/reproduce.py --dataset
mnist` (their last.ckpt under --reproduction), measures each along the 21 DCT subspaces with DeepFool and with FMN
(`evaluate_margins`, the same samples; a finished measurement of the same checkpoint file is reused, an interrupted
one resumes), and writes <out>/summary.json and <out>/row_ratios_<model>.png; with --docs it writes the section "How
tight are DeepFool's margins?" at the end of docs/RESULTS.md (replacing an earlier one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.compare import Run, compare_runs, plot_row_ratios  # noqa: E402
from margins import read_report  # noqa: E402
from margins.inputs import ModelSource  # noqa: E402
from margins.run.evaluate import evaluate_margins  # noqa: E402
from margins.settings import (  # noqa: E402
    DEFAULT_NUM_SAMPLES,  # noqa: E402
    AttackSettings,
    RowSettings,
    RunSettings,
)
from margins.store.results import MarginReport  # noqa: E402
from models import file_sha256  # noqa: E402
from plotting.margins import save_figure  # noqa: E402
from scripts.results_doc import CLAIMS, band_medians  # noqa: E402

MODELS = {  # kind (as in the results page's claims): (experiment name of the reproduction, title)
    "standard": ("mnist_lenet", "MNIST, LeNet"),
    "flipped": ("mnist_flipped_lenet", "Flipped MNIST, LeNet"),
    "robust": ("mnist_robust_lenet", "MNIST, LeNet, L2 PGD eps=2"),
    "flipped_robust": ("mnist_flipped_robust_lenet", "Flipped MNIST, LeNet, L2 PGD eps=2"),
}
SECTION = "## How tight are DeepFool's margins?"


def measure(kind: str, estimator: str, args: argparse.Namespace) -> MarginReport:
    """The margins of model `kind` with `estimator` (reused when finished, resumed when interrupted)."""
    name = MODELS[kind][0]
    folder = args.out / name / estimator
    checkpoint = args.reproduction / "logs" / name / "reproduce" / "checkpoints" / "last.ckpt"
    overwrite = False
    if (folder / "summary.json").is_file():
        report = read_report(folder)
        if report.settings.get("checkpoint_sha256") == file_sha256(checkpoint):
            return report
        print(f"{folder}: measured on another {checkpoint.name} (retrained since); measuring again", flush=True)
        overwrite = True
    attack = AttackSettings(estimator=estimator, fmn_steps=args.fmn_steps)
    report, _ = evaluate_margins(
        ModelSource(checkpoint, data_dir=str(args.data_dir)),
        rows=RowSettings(num_samples=args.num_samples, seed=args.seed),
        output_dir=folder,
        attack=attack,
        run=RunSettings(progress=False, overwrite=overwrite),
        command=["scripts/estimator_study.py"],
    )
    return report


def compare(kind: str, deepfool: MarginReport, fmn: MarginReport, args: argparse.Namespace) -> dict:
    """Row-by-row FMN / DeepFool per subspace, the fraction of rows where FMN is smaller, and the band medians of
    each estimator."""
    runs = [Run("DeepFool", deepfool.margins, deepfool.converged, deepfool.indices),
            Run("FMN", fmn.margins, fmn.converged, fmn.indices)]  # fmt: skip
    rows = [r for r in compare_runs(runs) if r["run"] == "FMN"]
    save_figure(plot_row_ratios(runs, compare_runs(runs), MODELS[kind][1]), args.out / f"row_ratios_{kind}.png")
    both = deepfool.converged & fmn.converged
    ratio = fmn.margins[both] / deepfool.margins[both]
    bands = {e: band_medians(r.margins) for e, r in (("deepfool", deepfool), ("fmn", fmn))}
    return {
        "title": MODELS[kind][1],
        "per_subspace_median_ratio": [r["row_ratio_median"] for r in rows],
        "per_subspace_fraction_smaller": [r["fraction_smaller"] for r in rows],
        "median_ratio": float(np.median(ratio)),
        "fraction_fmn_smaller": float((ratio < 1).mean()),
        "rows_both_converged": int(both.sum()),
        "not_converged": {"deepfool": int((~deepfool.converged).sum()), "fmn": int((~fmn.converged).sum())},
        "band_medians": {e: {"low": lo, "high": hi} for e, (lo, hi) in bands.items()},
        "median_margin": {
            "deepfool": np.median(deepfool.margins, axis=1).tolist(),
            "fmn": np.median(fmn.margins, axis=1).tolist(),
        },  # fmt: skip
        "seconds": {"deepfool": deepfool.extra.get("engine_seconds"), "fmn": fmn.extra.get("engine_seconds")},
    }


def claims(models: dict) -> list[dict]:
    """The MNIST claims these models decide, with each estimator's band medians."""
    out = []
    for claim in CLAIMS["mnist"]:
        (num_kind, num_q), (den_kind, den_q) = claim.numerator, claim.denominator
        if num_kind not in models or den_kind not in models or num_q not in ("low", "high"):
            continue
        values = {}
        for estimator in ("deepfool", "fmn"):
            num = models[num_kind]["band_medians"][estimator][num_q]
            den = models[den_kind]["band_medians"][estimator][den_q]
            values[estimator] = num / den
        out.append({"key": claim.key, "text": claim.text, "threshold": claim.threshold, **values})
    return out


def render(summary: dict) -> str:
    models, rows = summary["models"], summary["claims"]
    lines = [
        SECTION,
        "",
        "Every margin above is DeepFool's: the norm of a perturbation that changes the label, an upper bound on the "
        "smallest one. The same samples along the same 21 DCT subspaces, measured again with FMN (Pintor et al., "
        "NeurIPS 2021; `--estimator fmn`, attacks/fmn.py, "
        f"{summary['settings']['fmn_steps']} steps, constrained to each subspace) on the LeNets of this page, say "
        f"how far above: `python scripts/estimator_study.py --docs` ({_engine_seconds(models)}). Ratios are "
        "FMN / DeepFool row by row, over the rows where both changed the label.",
        "",
        "| model | median FMN / DeepFool | rows where FMN is smaller | lowest subspace | highest subspace "
        "| not converged (DeepFool, FMN) |",
        "|---|---|---|---|---|---|",
    ]
    for model in models.values():
        per = model["per_subspace_median_ratio"]
        lines.append(
            f"| {model['title']} | {model['median_ratio']:.2f} | {100 * model['fraction_fmn_smaller']:.0f}% of "
            f"{model['rows_both_converged']} | {per[0]:.2f} | {per[-1]:.2f} | {model['not_converged']['deepfool']}, "
            f"{model['not_converged']['fmn']} |"
        )
    lines += ["", "The paper's claims with either estimator (ratios of band medians, as above):", "",
              "| the paper's claim | DeepFool | FMN | holds with FMN? |", "|---|---|---|---|"]  # fmt: skip
    for row in rows:
        holds = "yes" if row["fmn"] > row["threshold"] else "**no**"
        lines.append(
            f"| {row['text']} | {row['deepfool']:.2f}x | {row['fmn']:.2f}x | {holds} (> {row['threshold']:g}) |"
        )
    lines += ["", _reading(models, rows), ""]
    return "\n".join(lines)


def _engine_seconds(models: dict) -> str:
    """Each estimator's seconds in the engine over all models, as recorded in the result folders."""
    deepfool = sum(m["seconds"]["deepfool"] or 0.0 for m in models.values())
    fmn = sum(m["seconds"]["fmn"] or 0.0 for m in models.values())
    return f"{deepfool:.1f} s in the engine for DeepFool, {fmn:.0f} s for FMN, one CPU thread"


def _reading(models: dict, rows: list[dict]) -> str:
    ratios = [m["median_ratio"] for m in models.values()]
    failed = [r["text"] for r in rows if r["fmn"] <= r["threshold"]]
    verdict = (
        f"All {len(rows)} claims these models decide hold with FMN's margins too."
        if not failed
        else f"{len(rows) - len(failed)} of the {len(rows)} claims these models decide hold with FMN's margins; not: "
        + "; ".join(failed)
        + "."
    )
    return (
        f"FMN's margins are {min(ratios):.2f}-{max(ratios):.2f} times DeepFool's (medians over the rows): along "
        f"these subspaces DeepFool's margins sit {1 / max(ratios):.1f}-{1 / min(ratios):.1f}x above the smallest "
        "perturbation FMN finds; the per-subspace ratio shows where (row_ratios_<model>.png in the study's output "
        f"folder). {verdict}"
    )


def write_section(text: str, page: Path) -> None:
    """Replace the section (to the end of the page, where it is written) or append it."""
    current = page.read_text() if page.is_file() else ""
    start = current.find(SECTION)
    kept = current[:start].rstrip() if start >= 0 else current.rstrip()
    page.write_text(kept + "\n\n" + text)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reproduction", type=Path, default=REPO / "outputs" / "reproduce_mnist")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "estimator_study")
    p.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fmn-steps", type=int, default=AttackSettings.fmn_steps)
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--docs", action="store_true", help="write the section into docs/RESULTS.md")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models = {}
    for kind in args.models:
        deepfool, fmn = measure(kind, "deepfool", args), measure(kind, "fmn", args)
        models[kind] = compare(kind, deepfool, fmn, args)
        print(f"{kind}: FMN / DeepFool median {models[kind]['median_ratio']:.3f}", flush=True)
    settings = {"num_samples": args.num_samples, "seed": args.seed, "fmn_steps": args.fmn_steps}
    summary = {"settings": settings, "models": models, "claims": claims(models),
               "minutes": (time.perf_counter() - start) / 60}  # fmt: skip
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    text = render(summary)
    print(text)
    if args.docs:
        write_section(text, REPO / "docs" / "RESULTS.md")
    return summary


if __name__ == "__main__":
    main()
