"""Console scripts of the installed package (pyproject.toml `[project.scripts]`) that need more than the module's
`main`: `hmt-train` finds the packaged configs by name (`hmt-train fit --config mnist_lenet`)."""

from __future__ import annotations

import sys

from configs import config_path


def resolve_configs(argv: list[str]) -> list[str]:
    """`argv` with each `--config NAME` (or `--config=NAME`) that is not an existing file replaced by the packaged
    config's path; anything else is left for LightningCLI to report."""
    out, expect = [], False
    for arg in argv:
        if expect:
            out.append(_resolved(arg))
        elif arg.startswith("--config="):
            out.append("--config=" + _resolved(arg.removeprefix("--config=")))
        else:
            out.append(arg)
        expect = arg == "--config"
    return out


def _resolved(name: str) -> str:
    try:
        return str(config_path(name))
    except FileNotFoundError:
        return name


def train() -> int:
    """`hmt-train ...`: `train.py ...` with config names resolved."""
    import train as train_module

    sys.argv[1:] = resolve_configs(sys.argv[1:])
    return train_module.cli()
