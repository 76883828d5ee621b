"""Margin experiments: one driver for every margin command (evaluate_margin.py, frequency_analysis.py, the
Lightning margin callback), laid out by job.

- settings: what is measured (`RowSettings`), how (`AttackSettings`), where (`RunSettings`).
- inputs: model and data from a checkpoint (`ModelSource`, `load_model_and_data`), samples read into tensors
  (`gather_samples`); the samples' choice is the rows' (`select_indices`, `load_indices` in `settings`).
- store: the result store and its schema: committed chunks (`store.chunks`), the report `MarginReport`, its one
  writer `write_report`, `read_report` (`store.results`), the estimators' words (`store.names`).
- run: running a measurement: `evaluate_margins` and the one measurement path (`run.evaluate`), the chunk work
  and how rows are cut and shared (`run.work`), processes through Lightning's `Trainer.predict` (`run.predict`), the
  watchdog and folder lock (`run.guard`).

The command-line flags are `cli.margin_flags`; the figures `plotting.margins`.
"""

from margins.settings import load_indices, select_indices
from margins.store.results import MarginReport, read_report, summarize, write_report

__all__ = [
    "MarginReport",
    "load_indices",
    "read_report",
    "select_indices",
    "summarize",
    "write_report",
]
