"""Margin experiments shared by `evaluate_margin.py` and the Lightning margin callback (pure Python/PyTorch).

- measure: choose samples (`select_indices`, `load_indices`, `gather_samples`) and run the attack
  (`measure_margins` -> `MarginRun`).
- results: `summarize`, atomic `write_margin_results`, `read_margin_results`.
- report: `save_margin_report`, the one writer used by evaluate_margin.py and the callback.
- plot: the paper's plot `plot_margins`, `save_figure`, `figure_to_array`.
"""

from margins.measure import MarginRun, gather_samples, load_indices, measure_margins, select_indices
from margins.plot import figure_to_array, plot_margins, save_figure
from margins.report import save_margin_report
from margins.results import read_margin_results, summarize, write_margin_results

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
