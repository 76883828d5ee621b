"""Margin experiments shared by `evaluate_margin.py` and the Lightning margin callback (pure Python/PyTorch).

- measure: choose samples (`select_indices`, `load_indices`, `gather_samples`) and run the attack
  (`measure_margins` -> `MarginRun`).
- results: `summarize`, atomic `write_margin_results`, `read_margin_results`.
- report: `save_margin_report`, the one writer used by evaluate_margin.py and the callback.
- plot: the paper's plot `plot_margins`, `save_figure`, `figure_to_array`.

The names of plot, report and results are imported on first use (module `__getattr__`), and results imports
matplotlib only when it draws a figure, so `import margins` for measuring does not load matplotlib.
"""

from __future__ import annotations

import importlib
from typing import Any

from margins.measure import MarginRun, gather_samples, load_indices, measure_margins, select_indices

_LAZY = {
    "figure_to_array": "margins.plot",
    "plot_margins": "margins.plot",
    "save_figure": "margins.plot",
    "save_margin_report": "margins.report",
    "read_margin_results": "margins.results",
    "summarize": "margins.results",
    "write_margin_results": "margins.results",
}

__all__ = [
    "MarginRun",
    "figure_to_array",
    "gather_samples",
    "load_indices",
    "measure_margins",
    "plot_margins",
    "read_margin_results",
    "save_figure",
    "save_margin_report",
    "select_indices",
    "summarize",
    "write_margin_results",
]


def __getattr__(name: str) -> Any:
    """Load the plotting/report names on first access (PEP 562)."""
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'margins' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
