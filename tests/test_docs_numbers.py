"""Every number of the generated pages comes from its source file in docs/data/ (copied from the run's summaries
by scripts/docs_data.py): each page or section re-rendered from its file equals the page's text exactly, and the
pages come from one run (the analyses and the studies measured the reproduction's checkpoints). The same checks on
fixture pages show they fail on a number edited by hand and on a page from another run."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pytest

from scripts import analyses_mnist, certify_study, docs_data, estimator_study, reproduce, results_doc

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
WRITTEN_ON = re.compile(r"Written by `[^`]*` on (\d{4}-\d{2}-\d{2}) \(")
OTHER_SECTIONS = (reproduce.BEYOND_THE_PAPER, certify_study.SECTION, estimator_study.SECTION)


@dataclass(frozen=True)
class Part:
    """The part of a page a docs/data file renders: `heading` None is the page up to its first section written by
    another script (OTHER_SECTIONS), "" the whole page, else the section from `heading` to the next "## "."""

    page: str
    heading: str | None
    render: Callable[[dict, str | None], str]

    @property
    def label(self) -> str:
        if self.heading is None:
            return f"docs/{self.page}, the part before '{reproduce.BEYOND_THE_PAPER.removeprefix('## ')}'"
        return f"docs/{self.page}" + (f", section '{self.heading.removeprefix('## ')}'" if self.heading else "")


PARTS = {
    "reproduce_mnist": Part("RESULTS.md", None, results_doc.render),
    "analyses_mnist": Part("ANALYSES.md", "", analyses_mnist.render),
    "estimator_study": Part("RESULTS.md", estimator_study.SECTION, lambda s, _: estimator_study.render(s)),
    "certify_study": Part("RESULTS.md", certify_study.SECTION, lambda s, _: certify_study.render(s)),
}


def cut(text: str, part: Part) -> tuple[int, str] | None:
    """(offset, text) of `part` in a page's `text`; None where the page lacks its section."""
    if part.heading == "":
        return 0, text
    if part.heading is None:
        ends = [i for h in OTHER_SECTIONS if (i := text.find("\n" + h)) >= 0]
        return 0, text[: min(ends)] if ends else text
    start = text.find(part.heading)
    if start < 0:
        return None
    end = text.find("\n## ", start + len(part.heading))
    return start, text[start : end if end >= 0 else None]


def first_difference(rendered: str, page: str) -> tuple[int, str] | None:
    """(1-based line, description) of the first line where `page` differs from `rendered`; None if equal."""
    if rendered == page:
        return None
    ours, theirs = rendered.split("\n"), page.split("\n")
    for line, (want, have) in enumerate(zip(ours, theirs), 1):
        if want != have:
            col = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), min(len(want), len(have)))
            lo = max(0, col - 30)
            return line, f"the page has ...{have[lo : col + 30]!r}..., the data renders ...{want[lo : col + 30]!r}..."
    longer = "goes on" if len(theirs) > len(ours) else "ends"
    return min(len(ours), len(theirs)) + 1, f"the page {longer} where the rendering does not"


def check(name: str, data: Path, docs: Path) -> str | None:
    """None when `docs`' part rendered from `data`/<name>.json matches the page, else what differs, and where."""
    part = PARTS[name]
    text = (docs / part.page).read_text() if (docs / part.page).is_file() else ""
    found = cut(text, part)
    if found is None:
        return f"{part.label}: no such section, yet {data.name}/{name}.json exists"
    offset, page = found
    date = WRITTEN_ON.search(page)
    source = data / f"{name}.json"
    rendered = part.render(json.loads(source.read_text()), date and date.group(1))
    differs = first_difference(rendered, page)
    if differs is None:
        return None
    line, what = differs
    where = text[:offset].count("\n") + line
    return f"{part.label}, line {where}: {what} ({source.relative_to(data.parent.parent)})"


def same_place(a: str | None, b: str | None) -> bool:
    """Whether two checkpoint paths name the same file of the run (absolute or relative to the repository: the
    last five parts, `logs/<experiment>/reproduce/checkpoints/last.ckpt`, are compared; the sha256 check below
    compares the files' contents)."""
    return a is not None and b is not None and Path(a).parts[-5:] == Path(b).parts[-5:]


def run_mismatches(data: dict[str, dict], checkpoints: dict[str, dict]) -> list[str]:
    """Where a page's data names or measured another checkpoint than the reproduction's (empty: one run)."""
    paths = {name: r["checkpoint"] for name, r in data["reproduce_mnist"]["results"].items()}
    out = []
    if "analyses_mnist" in data:
        named = data["analyses_mnist"]["settings"].get("checkpoints") or []
        wanted = [paths.get(name) for name in docs_data.ANALYSES.values()]
        if len(named) != len(wanted) or not all(map(same_place, named, wanted)):
            out.append(f"analyses_mnist measured the checkpoints {named}, the reproduction's LeNets are {wanted}")
    for kind, model in data.get("certify_study", {}).get("models", {}).items():
        if not same_place(model["checkpoint"], paths.get(docs_data.STUDIES[kind])):
            out.append(f"certify_study measured {model['checkpoint']} as {kind}, the reproduction's is "
                       f"{paths.get(docs_data.STUDIES[kind])}")  # fmt: skip
    ours = checkpoints.get("reproduce_mnist", {})
    out += [f"reproduce_mnist: no checkpoint sha256 recorded for {k}" for k, v in ours.items() if v is None]
    for name in sorted(set(data) - {"reproduce_mnist"}):
        if name not in checkpoints:
            out.append(f"checkpoints.json has no entry for {name}")
        for key, sha in checkpoints.get(name, {}).items():
            experiment = key.split("/")[0]
            if sha is None or sha != ours.get(experiment):
                out.append(f"{name}: {key} measured the checkpoint with sha256 {sha}, the reproduction's "
                           f"{experiment} has {ours.get(experiment)}")  # fmt: skip
    return out


def load(data: Path) -> tuple[dict[str, dict], dict[str, dict]]:
    """The docs/data files present, and checkpoints.json (empty where absent)."""
    present = {n: json.loads((data / f"{n}.json").read_text()) for n in PARTS if (data / f"{n}.json").is_file()}
    record = data / "checkpoints.json"
    return present, json.loads(record.read_text()) if record.is_file() else {}


# ---- the pages in docs/ ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(PARTS))
def test_each_page_is_rendered_from_its_data_file(name):
    if not (DOCS / "data" / f"{name}.json").is_file():
        pytest.skip(f"docs/data/{name}.json absent: run `python scripts/docs_data.py` after the regeneration")
    problem = check(name, DOCS / "data", DOCS)
    assert problem is None, problem


def test_the_pages_come_from_one_run():
    data, checkpoints = load(DOCS / "data")
    if "reproduce_mnist" not in data or len(data) < 2:
        pytest.skip("docs/data lacks reproduce_mnist.json or every other page's file: nothing to compare")
    assert not run_mismatches(data, checkpoints), "\n".join(run_mismatches(data, checkpoints))


def test_docs_data_knows_every_page_and_the_scripts_model_names():
    assert set(docs_data.SOURCES) == set(PARTS) == set(docs_data.KEEP)
    assert docs_data.ANALYSES == {kind: m[0] for kind, m in analyses_mnist.MODELS.items()}
    assert docs_data.STUDIES == {kind: m[0] for kind, m in estimator_study.MODELS.items()}


# ---- fixture pages: the checks pass on pages written as the scripts write them, fail on edited ones -----------
DATE = "2026-01-02"  # not today: the pages' own date is what is rendered
KINDS = ("standard", "flipped", "robust", "flipped_robust")


def _repro(out: Path) -> dict:
    experiments = {e.name: e for e in reproduce.experiments("mnist")}
    results = {}
    for i, kind in enumerate(KINDS):
        exp = experiments[docs_data.STUDIES[kind]]
        low, high = 0.5 + i, 7.25 - i
        results[exp.name] = {
            **asdict(exp), "checkpoint": f"outputs/reproduce_mnist/logs/{exp.name}/reproduce/checkpoints/last.ckpt",
            "margin_dir": str(out / "reproduce_mnist" / "margins" / exp.name), "margin_seconds": 12.5,
            "margin_samples": 100, "sample_accuracy": 0.97, "median_margin": [low, 3.0, high], "not_converged": i,
            "low_band_median": low, "high_band_median": high, "subspaces": "3 subspaces: 8x8 blocks, step 10, of "
            "1x28x28 images", "attack": reproduce.attack_text({"overshoot": 0.02, "max_iter": 100}),
            "device": "cpu", "train_seconds": 95.0 + i, "trained_by": "this run", "trained_epochs": 3,
            "trained_steps": 1407, "trained_batch_size": 128, "clean_accuracy": 0.9812 - i / 100,
            "test_samples": 10000, "pgd_accuracy": 0.4321 + i / 10, "pgd_samples": 1000,
        }  # fmt: skip
    return {"settings": {"dataset": "mnist", "epochs": 3, "seed": 0, "train_args": "", "out": "outputs/x"},
            "label": "MNIST", "command": "python scripts/reproduce.py --dataset mnist --docs", "seconds": 3000.0,
            "torch": "2.x", "device": "margins on CPU", "figure": "mnist_margins.png",
            "summary_file": "outputs/reproduce_mnist/summary.json", "per_net_claims": False, "results": results,
            "claims": results_doc.claim_values(results, "mnist", per_net=False)}  # fmt: skip


def _estimator() -> dict:
    models = {}
    for i, kind in enumerate(KINDS):
        bands = {e: {"low": 1.0 + i + j, "high": 9.0 - i - j} for j, e in enumerate(("deepfool", "fmn"))}
        models[kind] = {"title": estimator_study.MODELS[kind][1], "per_subspace_median_ratio": [0.91, 0.87, 0.83],
                        "per_subspace_fraction_smaller": [0.9, 0.8, 0.7], "median_ratio": 0.8765 - i / 50,
                        "fraction_fmn_smaller": 0.93, "rows_both_converged": 300, "not_converged": {"deepfool": i,
                        "fmn": 0}, "band_medians": bands, "seconds": {"deepfool": 4.25, "fmn": 61.0}}  # fmt: skip
    return {"settings": {"num_samples": 100, "seed": 0, "fmn_steps": 200}, "models": models,
            "claims": estimator_study.claims(models), "minutes": 3.0}  # fmt: skip


def _certify(out: Path, repro: dict) -> dict:
    models, rows = {}, []
    for i, kind in enumerate(KINDS):
        name = docs_data.STUDIES[kind]
        folders = {e: str(out / "certify_study" / name / e) for e in certify_study.ESTIMATORS}
        median = {e: [0.5 + i + j, 1.25 + j, 2.5 - j / 10] for j, e in enumerate(certify_study.ESTIMATORS)}
        models[kind] = {"title": estimator_study.MODELS[kind][1], "checkpoint": repro["results"][name]["checkpoint"],
                        "folders": folders, "per_subspace": {"median": median, "lower_over_fmn": [0.61, 0.52, 0.43],
                        "lower_over_fmn_all_rows": 0.567, "lower_over_deepfool_all_rows": 0.432,
                        "lower_above_upper": 0}, "seconds": {"certify": 300.0, "fmn": 61.0,
                        "deepfool": 4.25}}  # fmt: skip
    for claim in estimator_study.claims(_estimator()["models"]):
        attack = {"upper_B": 2.0, "ratio": 3.456, "holds": True, "fraction_of_samples": 0.87, "samples": 100,
                  "rows_without_label_change": 0}  # fmt: skip
        rows.append({**claim, "deepfool_ratio": 5.678, "certified_A": 6.9, "deepfool": attack, "fmn": attack})
    return {"settings": {"num_samples": 100, "seed": 0, "subspace_step": 10, "fmn_steps": 200,
                         "certify_method": "crown"}, "num_subspaces": 3, "models": models, "claims": rows,
            "summary_file": "outputs/certify_study/summary.json", "minutes": 20.0}  # fmt: skip


def _analyses(repro: dict) -> dict:
    sides = ("standard", "flipped")
    numbers = {"spearman": {"reflected": 0.912, "unreflected": -0.345},
               "spread": {s: {"dct": 12.34, "random": 1.56, "grid": 20.0} for s in sides},
               "heatmap_max_error": {"standard": 0.81, "flipped": 0.64},
               "heatmap_clean_error": {"standard": 0.012, "flipped": 0.034},
               "clean_accuracy": {"standard": 0.98, "flipped": 0.97}, "wilcoxon_significant": 19,
               "num_dct_subspaces": 21}  # fmt: skip
    checkpoints = [repro["results"][docs_data.ANALYSES[s]]["checkpoint"] for s in sides]
    return {"numbers": numbers, "seconds": 900.0, "train_seconds": {s: 0.0 for s in sides}, "torch": "2.x",
            "settings": {"epochs": 3, "num_samples": 100, "eps": 10.0, "heatmap_samples": 500,
                         "checkpoints": checkpoints}}  # fmt: skip


def _margin_folder(folder: Path, sha256: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "summary.json").write_text(json.dumps({"settings": {"checkpoint_sha256": sha256}}))


def _write_run(out: Path) -> None:
    """The four summaries under `out` as the scripts write them, and the margin folders they name (the
    checkpoint of experiment E has sha256 "sha-E")."""
    repro = _repro(out)
    summaries = {"reproduce_mnist": repro, "estimator_study": _estimator(), "certify_study": _certify(out, repro),
                 "analyses_mnist": _analyses(repro)}  # fmt: skip
    for name, summary in summaries.items():
        (out / name).mkdir(parents=True, exist_ok=True)
        (out / name / "summary.json").write_text(json.dumps(summary, indent=2))
    for experiment, r in repro["results"].items():
        _margin_folder(Path(r["margin_dir"]), f"sha-{experiment}")
    for name, folder in docs_data.measured_folders("analyses_mnist", {}, out / "analyses_mnist").items():
        _margin_folder(Path(folder), f"sha-{name.split('/')[0]}")
    for study in ("estimator_study", "certify_study"):
        for name, folder in docs_data.measured_folders(study, summaries[study], out / study).items():
            _margin_folder(Path(folder), f"sha-{name.split('/')[0]}")


def _write_pages(data: Path, docs: Path) -> None:
    """docs/RESULTS.md and docs/ANALYSES.md written from `data` as the regeneration writes them, in its order."""
    summary = {name: json.loads((data / f"{name}.json").read_text()) for name in PARTS}
    docs.mkdir(parents=True, exist_ok=True)
    old = "# Old page\n\n## Beyond the paper\n\nWritten by hand.\n\n## How tight are DeepFool's margins?\n\nold\n"
    page = docs / "RESULTS.md"
    page.write_text(results_doc.render(summary["reproduce_mnist"], DATE) + reproduce.keep_beyond_the_paper(old))
    (docs / "ANALYSES.md").write_text(analyses_mnist.render(summary["analyses_mnist"], DATE))
    estimator_study.write_section(estimator_study.render(summary["estimator_study"]), page)
    certify_study.write_section(certify_study.render(summary["certify_study"]), page)


@pytest.fixture
def run(tmp_path: Path) -> tuple[Path, Path]:
    """(docs/data, docs) of a fixture run: summaries copied by scripts/docs_data.py, pages written from them."""
    _write_run(tmp_path / "outputs")
    data, docs = tmp_path / "docs" / "data", tmp_path / "docs"
    docs_data.main(["--out", str(tmp_path / "outputs"), "--data", str(data)])
    _write_pages(data, docs)
    return data, docs


def test_docs_data_copies_the_summaries_whole_and_records_the_checkpoints(run, tmp_path):
    data, _ = run
    for name in PARTS:
        assert (data / f"{name}.json").read_bytes() == (tmp_path / "outputs" / name / "summary.json").read_bytes()
    checkpoints = json.loads((data / "checkpoints.json").read_text())
    assert checkpoints["estimator_study"]["mnist_robust_lenet/fmn"] == "sha-mnist_robust_lenet"
    assert checkpoints["analyses_mnist"]["mnist_flipped_lenet/dct"] == "sha-mnist_flipped_lenet"
    assert set(checkpoints["certify_study"]) == {f"{docs_data.STUDIES[k]}/{e}" for k in KINDS
                                                 for e in certify_study.ESTIMATORS}  # fmt: skip
    assert not list(data.glob("*.tmp"))


def test_the_fixture_pages_pass_and_come_from_one_run(run):
    data, docs = run
    assert all(check(name, data, docs) is None for name in PARTS), [check(n, data, docs) for n in PARTS]
    assert run_mismatches(*load(data)) == []
    assert "## Beyond the paper\n\nWritten by hand." in (docs / "RESULTS.md").read_text()


@pytest.mark.parametrize("name", list(PARTS))
def test_a_number_edited_by_hand_fails_naming_page_section_and_line(run, name):
    data, docs = run
    part = PARTS[name]
    text = (docs / part.page).read_text()
    offset, section = cut(text, part)
    number = list(re.finditer(r"\d\.\d\d", section))[3]  # a figure of a table or sentence, past the date
    digit = section[number.end() - 1]
    edited = section[: number.end() - 1] + ("1" if digit != "1" else "2") + section[number.end() :]
    (docs / part.page).write_text(text[:offset] + edited + text[offset + len(section) :])
    line = text[:offset].count("\n") + section[: number.start()].count("\n") + 1
    problem = check(name, data, docs)
    assert problem is not None and problem.startswith(f"{part.label}, line {line}: the page has"), problem


def test_a_page_from_another_run_fails(run):
    data, docs = run
    other = json.loads((data / "certify_study.json").read_text())
    other["models"]["robust"]["per_subspace"]["lower_over_fmn_all_rows"] = 0.5
    (data / "certify_study.json").write_text(json.dumps(other))
    assert "section 'Certified margins', line" in check("certify_study", data, docs)


def test_studies_of_other_checkpoints_fail_the_one_run_check(run):
    data, _ = run
    present, checkpoints = load(data)
    checkpoints["estimator_study"]["mnist_lenet/fmn"] = "sha-retrained"
    present["analyses_mnist"]["settings"]["checkpoints"] = None  # trained its own LeNets
    present["certify_study"]["models"]["flipped"]["checkpoint"] = "elsewhere/last.ckpt"
    problems = run_mismatches(present, checkpoints)
    assert len(problems) == 3, problems
    assert "mnist_lenet/fmn measured the checkpoint with sha256 sha-retrained" in problems[-1]
    del checkpoints["analyses_mnist"]
    assert "checkpoints.json has no entry for analyses_mnist" in run_mismatches(present, checkpoints)


def test_the_pages_are_dated_today_unless_a_date_is_given(run):
    data, _ = run
    today = f" on {dt.date.today().isoformat()} (torch"
    assert today in results_doc.render(json.loads((data / "reproduce_mnist.json").read_text()))
    assert today in analyses_mnist.render(json.loads((data / "analyses_mnist.json").read_text()))
