"""The experiment configs (`*.yaml`, one LightningCLI config each), installed with the package as data, so that
`hmt-train fit --config mnist_lenet` and `scripts/reproduce.py` find them outside a clone too."""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent


def config_names() -> list[str]:
    """The configs' names (file stems), sorted."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def config_path(name: str | Path) -> Path:
    """A config by path (as given, when that file exists) or by name: `mnist_lenet`, `mnist_lenet.yaml` or
    `configs/mnist_lenet.yaml` -> the packaged `<CONFIG_DIR>/mnist_lenet.yaml`. FileNotFoundError names the configs."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    packaged = CONFIG_DIR / f"{path.stem}.yaml"
    if path.suffix in ("", ".yaml") and packaged.is_file():
        return packaged
    raise FileNotFoundError(f"no config {str(name)!r}: pass a path, or one of {', '.join(config_names())}")
