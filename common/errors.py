"""The one exception type for bad user input.

Command lines turn an `InputError` (and only an `InputError`) into one line `error: <message>` with exit status 2;
anything else is a bug and shows its traceback (exit 1). Its message names the problem and the fix, in one line.
Library errors that are input errors (a missing dataset, a checkpoint that does not fit the model, ...) subclass it.
"""

from __future__ import annotations


class InputError(ValueError):
    """Bad input from the user (file, flag, setting); the message is one line naming the problem and the fix."""
