"""The command-line parser every script of this project uses."""

from __future__ import annotations

import argparse

from common.errors import InputError


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` whose usage errors raise `InputError` (one line, exit 2 in `main`), not SystemExit."""

    def error(self, message: str) -> None:
        raise InputError(f"{message} (see --help)")
