"""The MNIST experiments: `scripts/reproduce.py --dataset mnist` (same flags), kept under its earlier name.

python scripts/reproduce_mnist.py --data-dir ../shared/data --out outputs/reproduce_mnist --docs
python scripts/reproduce_mnist.py --quick --out /tmp/quick      # the slow test's version: --help says what it trains
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from a clone: the project's packages

from scripts import reproduce  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """`reproduce.main` for MNIST; returns the summary."""
    return reproduce.main(["--dataset", "mnist", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
