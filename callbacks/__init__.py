"""Lightning callbacks."""

from callbacks.epoch_line import EpochLine
from callbacks.margin import MarginCallback

__all__ = ["EpochLine", "MarginCallback"]
