"""Running a margin measurement: the Python entry point `evaluate_margins` and the one measurement path every
driver takes (`evaluate`), the chunk work and how rows are cut into chunks and shared (`work`), processes through
Lightning's `Trainer.predict` (`predict`), the watchdog, stop file and folder lock (`guard`)."""

from margins.run.evaluate import evaluate_margins

__all__ = ["evaluate_margins"]
