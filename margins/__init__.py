"""Margin experiments: one driver for every margin command (evaluate_margin.py, frequency_analysis.py, the
Lightning margin callback).

- measure: choose samples (`select_indices`, `load_indices`, `gather_samples`).
- inputs: model and data from a checkpoint (`ModelSource`, `load_model_and_data`), subspaces (`SubspaceSpec`).
- work: the chunk work shared by every driver (`ChunkWork`, `AttackSettings`, `RunSettings`, `merge_chunks`).
- evaluate: `evaluate_margins`, the Python entry point (through Lightning's `Trainer.predict`).
- results: the report schema `MarginReport`, its one writer `write_report`, `read_report`, `summarize`.
- plot: the paper's plot `plot_margins`, `save_figure`, `figure_to_array`.
"""

from margins.measure import gather_samples, load_indices, select_indices
from margins.plot import figure_to_array, plot_margins, save_figure
from margins.results import MarginReport, read_report, summarize, write_report

__all__ = [
    "MarginReport",
    "figure_to_array",
    "gather_samples",
    "load_indices",
    "plot_margins",
    "read_report",
    "save_figure",
    "select_indices",
    "summarize",
    "write_report",
]
