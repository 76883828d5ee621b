"""Copy the result summaries behind the generated pages into docs/data/, so that every number of those pages has a
source file in git, and record which checkpoints they measured:

    python scripts/docs_data.py [--out outputs] [--data docs/data]

For each of SOURCES whose <out>/<name>/summary.json exists: docs/data/<name>.json, the file whole (written to a
temporary file, then renamed; above LIMIT bytes only the keys the page renderers read). Then docs/data/
checkpoints.json: per page copied now (the others' entries kept), the sha256 of the checkpoint each result folder
behind it measured (as the folder's summary.json records it), keyed "<experiment>" for the reproduction and
"<experiment>/<measurement>" for the others.
tests/test_docs_numbers.py re-renders every page from these files and checks the pages come from one run.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = {  # docs/data name: the page it renders (scripts/...: render)
    "reproduce_mnist": "docs/RESULTS.md, up to its section 'Beyond the paper' (results_doc.py)",
    "analyses_mnist": "docs/ANALYSES.md (analyses_mnist.py)",
    "estimator_study": "docs/RESULTS.md, section 'How tight are DeepFool's margins?' (estimator_study.py)",
    "certify_study": "docs/RESULTS.md, section 'Certified margins' (certify_study.py)",
}
LIMIT = 200_000  # bytes; the summaries are far smaller (tens of KB)
KEEP = {  # the top-level keys each renderer reads, kept from a summary above LIMIT
    "reproduce_mnist": ("settings", "label", "command", "seconds", "torch", "device", "figure", "summary_file",
                        "per_net_claims", "results", "claims"),
    "analyses_mnist": ("numbers", "seconds", "train_seconds", "torch", "settings"),
    "estimator_study": ("settings", "models", "claims"),
    "certify_study": ("settings", "num_subspaces", "models", "claims", "summary_file"),
}  # fmt: skip
ANALYSES = {"standard": "mnist_lenet", "flipped": "mnist_flipped_lenet"}  # scripts/analyses_mnist.py MODELS
STUDIES = {"standard": "mnist_lenet", "flipped": "mnist_flipped_lenet", "robust": "mnist_robust_lenet",
           "flipped_robust": "mnist_flipped_robust_lenet"}  # fmt: skip  # scripts/estimator_study.py MODELS


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds `data` whole or keeps what it held."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def copied(name: str, source: Path) -> bytes:
    """The summary file's bytes, or only the keys its renderer reads when it is larger than LIMIT."""
    data = source.read_bytes()
    if len(data) <= LIMIT:
        return data
    summary = json.loads(data)
    return json.dumps({k: summary[k] for k in KEEP[name] if k in summary}, indent=2).encode()


def folder_sha256(folder: str | Path) -> str | None:
    """The checkpoint sha256 a result folder records (a relative path is the repository's); None where absent."""
    path = Path(folder) if Path(folder).is_absolute() else REPO / folder
    summary = path / "summary.json"
    return json.loads(summary.read_text())["settings"].get("checkpoint_sha256") if summary.is_file() else None


def measured_folders(name: str, summary: dict, source_dir: Path) -> dict[str, Path | str]:
    """The result folders behind a page: "<experiment>" or "<experiment>/<measurement>" -> folder."""
    if name == "reproduce_mnist":
        return {experiment: r["margin_dir"] for experiment, r in summary["results"].items()}
    if name == "analyses_mnist":
        return {f"{experiment}/{family}": source_dir / kind / family for kind, experiment in ANALYSES.items()
                for family in ("grid", "dct", "random")}  # fmt: skip
    if name == "estimator_study":
        return {f"{STUDIES[kind]}/{e}": source_dir / STUDIES[kind] / e for kind in summary["models"]
                for e in ("deepfool", "fmn")}  # fmt: skip
    return {f"{STUDIES[kind]}/{e}": folder for kind, model in summary["models"].items()
            for e, folder in model["folders"].items()}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, dict[str, str | None]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "outputs", help="where the runs behind the pages are")
    p.add_argument("--data", type=Path, default=REPO / "docs" / "data", help="where the copies go")
    args = p.parse_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)
    checkpoints = {}
    for name, page in SOURCES.items():
        source = args.out / name / "summary.json"
        if not source.is_file():
            print(f"{name}: no {source}, skipped ({page} keeps its old data file, if any)")
            continue
        data = copied(name, source)
        write_atomic(args.data / f"{name}.json", data)
        folders = measured_folders(name, json.loads(data), source.parent)
        checkpoints[name] = {key: folder_sha256(folder) for key, folder in folders.items()}
        missing = [key for key, sha in checkpoints[name].items() if sha is None]
        note = f"; no checkpoint sha256 recorded for {', '.join(missing)}" if missing else ""
        print(f"{name}: {source} -> {args.data / f'{name}.json'} ({len(data)} bytes){note}")
    record = args.data / "checkpoints.json"
    kept = json.loads(record.read_text()) if record.is_file() else {}  # of the data files not replaced now
    checkpoints = {**kept, **checkpoints}
    write_atomic(record, (json.dumps(checkpoints, indent=2) + "\n").encode())
    return checkpoints


if __name__ == "__main__":
    main()
