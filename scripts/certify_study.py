"""Certified margins: a proven lower bound on every row beside DeepFool's and FMN's margins (upper bounds), on the MNIST
LeNets of docs/RESULTS.md, and the paper's claims checked with the certified bounds on their large side.

    python scripts/certify_study.py [--reproduction outputs/reproduce_mnist] [--num-samples 100] [--docs]

Takes the standard, flipped, PGD-trained and flipped PGD-trained LeNets trained by `scripts/reproduce.py --dataset
mnist` (their last.ckpt under --reproduction) and measures each along the 21 DCT subspaces (8x8 blocks, step 1) with
the certifier (`--estimator certify`, attacks/certify), FMN and DeepFool through `evaluate_margins`, the same samples.
A finished measurement of the same checkpoint file with the same settings is reused: this study's own (<out>/<model>/
<estimator>) or, for DeepFool and FMN, scripts/estimator_study.py's (--estimator-study); an interrupted one resumes.

Writes <out>/summary.json (every figure of the section, and the result folder each comes from) and, with --docs, the
section "Certified margins" of docs/RESULTS.md (replaced in place; a new one goes before "How tight are DeepFool's
margins?", which scripts/estimator_study.py rewrites to the end of the page).

Per model and subspace: the median certified lower bound, FMN's and DeepFool's median margins, and the median over
the rows of lower / FMN. Per claim "band A's margins are larger than band B's" of the results page (scripts/
results_doc.py: ratio of band medians above a threshold): the median certified bound over band A against each
attack's median margin over band B, and the fraction of samples for which it holds sample by sample (each sample's
median over the band's subspaces). Since certified <= true margin <= attack row by row, and medians keep that order,
a ratio above the threshold proves the claim for the true margins of these samples.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from analysis.compare import Run, interval_rows, paired_columns  # noqa: E402
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
from scripts.estimator_study import MODELS  # noqa: E402
from scripts.results_doc import CLAIMS  # noqa: E402

ESTIMATORS = ("certify", "fmn", "deepfool")
SECTION = "## Certified margins"
BEFORE = "## How tight are DeepFool's margins?"  # a new section goes before it (estimator_study.py rewrites it)


def checkpoint(kind: str, args: argparse.Namespace) -> Path:
    return args.reproduction / "logs" / MODELS[kind][0] / "reproduce" / "checkpoints" / "last.ckpt"


def attack_settings(estimator: str, args: argparse.Namespace) -> AttackSettings:
    return AttackSettings(estimator=estimator, fmn_steps=args.fmn_steps, certify_method=args.certify_method)


def reusable(folder: Path, ckpt_sha256: str, estimator: str, args: argparse.Namespace) -> MarginReport | None:
    """The finished report in `folder` when it measured this checkpoint file with this study's settings."""
    if not (folder / "summary.json").is_file():
        return None
    report = read_report(folder)
    s = report.settings
    attack = attack_settings(estimator, args)
    own = json.loads(json.dumps(attack.engine().settings()))
    wanted = {"checkpoint_sha256": ckpt_sha256, "num_samples": args.num_samples, "seed": args.seed, "subspace": "dct",
              "subspace_dim": 8, "subspace_step": args.subspace_step, "estimator_settings": own,
              "dtype": attack.precision}  # fmt: skip
    return report if all(s.get(k) == v for k, v in wanted.items()) else None


def measure(kind: str, estimator: str, args: argparse.Namespace) -> tuple[MarginReport, Path]:
    """Model `kind` measured with `estimator`: a finished matching folder reused, else measured (resuming)."""
    name, ckpt = MODELS[kind][0], checkpoint(kind, args)
    sha256 = file_sha256(ckpt)
    folder = args.out / name / estimator
    candidates = [folder] + ([args.estimator_study / name / estimator] if estimator != "certify" else [])
    for candidate in candidates:
        report = reusable(candidate, sha256, estimator, args)
        if report is not None:
            return report, candidate
    overwrite = (folder / "summary.json").is_file()  # another checkpoint or other settings: measured again
    if overwrite:
        print(f"{folder}: measured with another checkpoint or settings; measuring again", flush=True)
    report, _ = evaluate_margins(
        ModelSource(ckpt, data_dir=str(args.data_dir)),
        rows=RowSettings(
            num_samples=args.num_samples, seed=args.seed, subspace_dim=8, subspace_step=args.subspace_step
        ),
        output_dir=folder,
        attack=attack_settings(estimator, args),
        run=RunSettings(progress=False, overwrite=overwrite, threads=args.threads),
        command=["scripts/certify_study.py"],
    )
    return report, folder


def runs_of(reports: dict[str, MarginReport]) -> dict[str, Run]:
    return {e: Run(e, r.margins, r.converged, r.indices, estimator=e) for e, r in reports.items()}


def per_subspace(runs: dict[str, Run]) -> dict:
    """Medians per subspace of each estimator (all samples) and lower / FMN row by row (rows where FMN converged)."""
    against_fmn = interval_rows(runs["certify"], runs["fmn"])
    return {
        "median": {e: np.median(run.margins.astype(np.float64), axis=1).tolist() for e, run in runs.items()},
        "lower_over_fmn": [row["row_ratio_median"] for row in against_fmn],
        "lower_over_fmn_all_rows": _row_ratio(runs["certify"], runs["fmn"]),
        "lower_over_deepfool_all_rows": _row_ratio(runs["certify"], runs["deepfool"]),
        "lower_above_upper": sum(row["lower_above_upper"] for row in against_fmn)
        + sum(row["lower_above_upper"] for row in interval_rows(runs["certify"], runs["deepfool"])),
    }


def _row_ratio(lower: Run, upper: Run) -> float:
    """Median over every row where the attack changed the label of lower / upper."""
    a, b = paired_columns(lower, upper)
    lo, up = lower.margins[:, a].astype(np.float64), upper.margins[:, b].astype(np.float64)
    rows = upper.converged[:, b] & (up > 0)
    return float(np.median(lo[rows] / up[rows]))


def band_width(num_subspaces: int) -> int:
    """Subspaces in a band, as the results page (scripts/results_doc.py `band_medians`): 3, fewer below 9."""
    return max(1, min(3, num_subspaces // 3))


def band(margins: np.ndarray, which: str) -> np.ndarray:
    """The rows `[w, N]` of the lowest (`which` = "low") or highest `w` subspaces of `margins: [S, N]`."""
    w = band_width(margins.shape[0])
    return margins[:w] if which == "low" else margins[-w:]


def claims(reports: dict[str, dict[str, MarginReport]]) -> list[dict]:
    """Each claim "band A larger than band B" these models decide, with the certified bounds on A's side against
    each attack's margins on B's side: the ratio of band medians, whether it exceeds the claim's threshold, and the
    fraction of samples (aligned by dataset index) whose own band medians exceed it. A row where the attack found no
    label change has no upper bound: it counts as infinite (`upper_bounds`)."""
    out = []
    for claim in CLAIMS["mnist"]:
        (a_kind, a_band), (b_kind, b_band) = claim.numerator, claim.denominator
        if a_kind not in reports or b_kind not in reports or {a_band, b_band} - {"low", "high"}:
            continue
        lower = reports[a_kind]["certify"]
        row = {"key": claim.key, "text": claim.text, "threshold": claim.threshold, "A": [a_kind, a_band],
               "B": [b_kind, b_band]}  # fmt: skip
        deepfool_a = np.median(band(reports[a_kind]["deepfool"].margins, a_band).astype(np.float64))
        deepfool_b = np.median(band(reports[b_kind]["deepfool"].margins, b_band).astype(np.float64))
        row["deepfool_ratio"] = float(deepfool_a / deepfool_b)  # the claim as the page measures it
        row["certified_A"] = float(np.median(band(lower.margins, a_band).astype(np.float64)))
        for attack in ("deepfool", "fmn"):
            upper = reports[b_kind][attack]
            a, b = _aligned(lower, upper)
            upper_b = float(np.median(band(upper_bounds(upper), b_band)))
            per_sample_lower = np.median(band(lower.margins[:, a].astype(np.float64), a_band), axis=0)
            per_sample_upper = np.median(band(upper_bounds(upper)[:, b], b_band), axis=0)
            ratio = row["certified_A"] / upper_b
            row[attack] = {
                "upper_B": upper_b,
                "ratio": ratio,
                "holds": bool(ratio > claim.threshold),
                "fraction_of_samples": float(np.mean(per_sample_lower > claim.threshold * per_sample_upper)),
                "samples": int(len(a)),
                "rows_without_label_change": int((~band(upper.converged, b_band)).sum()),
            }
        out.append(row)
    return out


def upper_bounds(report: MarginReport) -> np.ndarray:
    """An attack's margins `[S, N]` as upper bounds on the true margins: infinite where it changed no label."""
    return np.where(report.converged, report.margins.astype(np.float64), np.inf)


def _aligned(a: MarginReport, b: MarginReport) -> tuple[np.ndarray, np.ndarray]:
    columns = paired_columns(Run("a", a.margins, a.converged, a.indices), Run("b", b.margins, b.converged, b.indices))
    if columns is None:
        raise SystemExit("error: the certified and attack runs hold different samples; measure them with one seed")
    return columns


def render(summary: dict) -> str:
    models, rows = summary["models"], summary["claims"]
    s = summary["settings"]
    lines = [
        SECTION,
        "",
        "DeepFool's and FMN's margins (the sections above and below) are upper bounds: each is the norm of a "
        "perturbation that changes the label. The certifier (`--estimator certify`, attacks/certify, method "
        f"`{s['certify_method']}`, float64) proves the opposite side: no perturbation in the subspace of norm below "
        "its bound changes the label. So every row's true margin lies in [certified lower bound, attack's margin]. "
        f"The same {s['num_samples']} samples along the same {summary['num_subspaces']} DCT subspaces of the LeNets "
        f"of this page: `python scripts/certify_study.py --docs` ({_seconds(models)}). Every number below is in "
        f"`{summary['summary_file']}`, computed from the result folders listed there.",
        "",
        "| model | median certified / FMN (rows) | median certified / DeepFool (rows) | certified above an attack |",
        "|---|---|---|---|",
    ]
    for model in models.values():
        p = model["per_subspace"]
        lines.append(f"| {model['title']} | {p['lower_over_fmn_all_rows']:.3f} | "
                     f"{p['lower_over_deepfool_all_rows']:.3f} | {p['lower_above_upper']} rows |")  # fmt: skip
    lines += ["", _claims_text(rows), ""]
    lines += _claims_table(rows)
    for model in models.values():
        median = model["per_subspace"]["median"]
        lines += ["", f"**{model['title']}**: median per subspace (low to high frequency)", "",
                  "| subspace | certified lower bound | FMN | DeepFool | lower / FMN (rows) |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for k, ratio in enumerate(model["per_subspace"]["lower_over_fmn"]):
            lines.append(f"| {k} | {median['certify'][k]:.3g} | {median['fmn'][k]:.3g} | "
                         f"{median['deepfool'][k]:.3g} | {ratio:.3f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _claims_text(rows: list[dict]) -> str:
    proven = {attack: sum(r[attack]["holds"] for r in rows) for attack in ("deepfool", "fmn")}
    return (
        "The page's claims \"band A's margins are larger than band B's\" (band = the 3 lowest or 3 highest "
        "subspaces, ratio of band medians above the page's threshold), with the certified lower bounds on band A's "
        "side against an attack's margins on band B's side: a ratio above the threshold proves the claim for the "
        "true margins of these samples. Samples: the fraction whose own band medians pass. "
        f"Proven: {proven['deepfool']} of {len(rows)} against DeepFool's margins, {proven['fmn']} of {len(rows)} "
        "against FMN's."
    )


def _claims_table(rows: list[dict]) -> list[str]:
    lines = [
        "| the paper's claim | DeepFool A / B (the page) | certified A / DeepFool B | samples | certified A / FMN B "
        "| samples |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = []
        for attack in ("deepfool", "fmn"):
            r = row[attack]
            verdict = "proven" if r["holds"] else "**not proven**"
            cells.append(f"{r['ratio']:.2f}x: {verdict} (> {row['threshold']:g}) | "
                         f"{100 * r['fraction_of_samples']:.0f}% of {r['samples']}")  # fmt: skip
        lines.append(f"| {row['text']} | {row['deepfool_ratio']:.2f}x | {' | '.join(cells)} |")
    return lines


def _seconds(models: dict) -> str:
    total = {e: sum(m["seconds"][e] or 0.0 for m in models.values()) for e in ESTIMATORS}
    return (f"engine seconds over the {len(models)} models as recorded in the result folders: certifier "
            f"{total['certify']:.0f} s, FMN {total['fmn']:.0f} s, DeepFool {total['deepfool']:.1f} s")  # fmt: skip


def write_section(text: str, page: Path) -> None:
    """Replace the section in place (to the next "## " heading), or insert it before BEFORE, or append it."""
    current = page.read_text() if page.is_file() else ""
    start = current.find(SECTION)
    if start >= 0:
        end = current.find("\n## ", start + len(SECTION))
        rest = current[end + 1 :] if end >= 0 else ""
        page.write_text(current[:start] + text + ("\n" + rest if rest else ""))
        return
    before = current.find(BEFORE)
    if before >= 0:
        page.write_text(current[:before] + text + "\n" + current[before:])
        return
    page.write_text(current.rstrip() + "\n\n" + text)


def study(kind: str, args: argparse.Namespace) -> tuple[dict, dict[str, MarginReport]]:
    reports, folders = {}, {}
    for estimator in ESTIMATORS:
        reports[estimator], folders[estimator] = measure(kind, estimator, args)
    model = {
        "title": MODELS[kind][1],
        "checkpoint": str(checkpoint(kind, args)),
        "folders": {e: str(f) for e, f in folders.items()},
        "per_subspace": per_subspace(runs_of(reports)),
        "seconds": {e: r.extra.get("engine_seconds") for e, r in reports.items()},
        "certifier_settings": reports["certify"].settings.get("estimator_settings"),
    }
    return model, reports


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reproduction", type=Path, default=REPO / "outputs" / "reproduce_mnist")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=REPO / "outputs" / "certify_study")
    p.add_argument("--estimator-study", type=Path, default=REPO / "outputs" / "estimator_study",
                   help="estimator_study.py's --out: its finished DeepFool and FMN folders are reused")  # fmt: skip
    p.add_argument("--num-samples", type=int, default=DEFAULT_NUM_SAMPLES)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subspace-step", type=int, default=1, help="DCT block step (8x8 blocks; default 1: 21 blocks)")
    p.add_argument("--fmn-steps", type=int, default=AttackSettings.fmn_steps)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="CPU threads (default: every core; the certifier's bound passes are large matrix products: on "
                   "2 threads it kept 1.9 cores busy, benchmarks/bench_certify.py in docs/CERTIFY.md)")  # fmt: skip
    p.add_argument("--certify-method", default=AttackSettings.certify_method)
    p.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS))
    p.add_argument("--docs", action="store_true", help="write the section into docs/RESULTS.md")
    p.add_argument("--page", type=Path, default=REPO / "docs" / "RESULTS.md", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    models, reports = {}, {}
    for kind in args.models:
        models[kind], reports[kind] = study(kind, args)
        print(f"{kind}: certified / FMN median {models[kind]['per_subspace']['lower_over_fmn_all_rows']:.3f}",
              flush=True)  # fmt: skip
    settings = {"num_samples": args.num_samples, "seed": args.seed, "subspace_step": args.subspace_step,
                "fmn_steps": args.fmn_steps, "certify_method": args.certify_method}  # fmt: skip
    summary_file = args.out / "summary.json"
    summary = {"settings": settings, "num_subspaces": int(next(iter(reports.values()))["certify"].margins.shape[0]),
               "models": models, "claims": claims(reports), "summary_file": _shown(summary_file),
               "minutes": (time.perf_counter() - start) / 60}  # fmt: skip
    summary_file.write_text(json.dumps(summary, indent=2) + "\n")
    text = render(summary)
    print(text)
    if args.docs:
        write_section(text, args.page)
    return summary


def _shown(path: Path) -> str:
    """`path` relative to the repository when inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
