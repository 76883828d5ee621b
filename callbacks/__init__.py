"""Lightning callbacks."""

from callbacks.margin import MarginCallback

__all__ = ["MarginCallback"]
