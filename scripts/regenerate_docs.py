"""Regenerate every results page and figure of docs/ from the current code, in one command:

    python scripts/regenerate_docs.py [--data-dir ../shared/data] [--out outputs] [--epochs N]

1. `scripts/reproduce.py --dataset mnist --docs`: trains the seven MNIST experiments, measures their margins and
   writes docs/RESULTS.md and docs/mnist_margins.png (about an hour on 2 CPU cores);
2. `scripts/analyses_mnist.py --docs` on the standard and flipped LeNets of step 1: docs/ANALYSES.md and
   docs/analysis_*.png (2-D maps, DCT vs random subspaces, Fourier heat maps, comparison);
3. `scripts/estimator_study.py --docs` on the LeNets of step 1: the section "How tight are DeepFool's margins?"
   of docs/RESULTS.md;
4. `scripts/certify_study.py --docs` on the LeNets of step 1 (reusing step 3's DeepFool and FMN folders): the
   section "Certified margins" of docs/RESULTS.md;
5. `scripts/tensorboard_screenshots.py` (when Chromium is installed): docs/tensorboard_*.png from two short fits;
6. `scripts/docs_data.py`: the summaries of steps 1-4 copied into docs/data/<name>.json (and the checkpoints their
   result folders measured into docs/data/checkpoints.json), the source files of those pages' numbers, which
   tests/test_docs_numbers.py re-renders and compares with the pages.
Each step reuses what an interrupted earlier run of it left (trainings resume, finished measurements are reused).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def step(name: str, argv: list[str]) -> None:
    start = time.perf_counter()
    print(f"== {name}: python {' '.join(argv)}", flush=True)
    subprocess.run([sys.executable, *argv], cwd=REPO, check=True)
    print(f"== {name}: {time.perf_counter() - start:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--out", type=Path, default=REPO / "outputs", help="where the runs behind the pages go")
    p.add_argument("--epochs", type=int, help="training epochs per model (default: reproduce.py's, 10 for MNIST)")
    args = p.parse_args(argv)
    reproduction = args.out / "reproduce_mnist"
    epochs = ["--epochs", str(args.epochs)] if args.epochs else []
    step("reproduction", ["scripts/reproduce.py", "--dataset", "mnist", "--data-dir", str(args.data_dir), "--out",
                          str(reproduction), *epochs, "--docs"])  # fmt: skip
    logs = reproduction / "logs"
    checkpoints = [str(logs / name / "reproduce" / "checkpoints" / "last.ckpt") for name in
                   ("mnist_lenet", "mnist_flipped_lenet")]  # fmt: skip
    step("analyses", ["scripts/analyses_mnist.py", "--data-dir", str(args.data_dir), "--out",
                      str(args.out / "analyses_mnist"), "--checkpoints", *checkpoints, "--docs"])  # fmt: skip
    step("estimators", ["scripts/estimator_study.py", "--reproduction", str(reproduction), "--data-dir",
                        str(args.data_dir), "--out", str(args.out / "estimator_study"), "--docs"])  # fmt: skip
    step("certified margins", ["scripts/certify_study.py", "--reproduction", str(reproduction), "--data-dir",
                               str(args.data_dir), "--out", str(args.out / "certify_study"), "--estimator-study",
                               str(args.out / "estimator_study"), "--docs"])  # fmt: skip
    screenshots = REPO / "scripts" / "tensorboard_screenshots.py"
    if screenshots.is_file() and shutil.which("chromium"):
        step("TensorBoard", [str(screenshots.relative_to(REPO)), "--data-dir", str(args.data_dir)])
    else:
        print("TensorBoard screenshots skipped: needs Chromium (apt-get install chromium)", flush=True)
    step("docs data", ["scripts/docs_data.py", "--out", str(args.out)])


if __name__ == "__main__":
    main()
