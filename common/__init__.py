"""Small pieces shared by every package: the project's input-error type."""

from common.errors import InputError

__all__ = ["InputError"]
