"""The package builds (offline: no build isolation, no dependencies) into a wheel that keeps the top-level layout,
carries the configs and the console scripts, and imports from another directory without the clone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ["analysis", "attacks", "callbacks", "cli", "common", "configs", "datamodules", "frequency",
            "lightning_modules", "margins", "models", "plotting", "scripts"]  # fmt: skip
MODULES = ["train", "evaluate_margin", "frequency_analysis", "compare_margins"]
SCRIPTS = {
    "hmt-train": "scripts.entry_points:train",
    "hmt-evaluate-margin": "evaluate_margin:main",
    "hmt-frequency-analysis": "frequency_analysis:main",
    "hmt-compare-margins": "compare_margins:main",
    "hmt-reproduce": "scripts.reproduce:cli",
}
SKIP = shutil.ignore_patterns(".git", ".venv", "outputs", "logs", "lightning_logs", "build", "dist", "*.egg-info",
                              "__pycache__", ".pytest_cache", ".ruff_cache", "data", "tests", "docs")  # fmt: skip


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the source tree (the build writes build/ and *.egg-info beside its sources)."""
    pytest.importorskip("setuptools", reason="pip wheel --no-build-isolation needs setuptools (requirements-dev.txt)")
    root = tmp_path_factory.mktemp("build")
    shutil.copytree(REPO, root / "src", ignore=SKIP)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
           "-w", str(root / "wheel"), str(root / "src")]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    (path,) = (root / "wheel").glob("*.whl")
    return path


def test_wheel_keeps_the_layout_and_carries_configs_scripts_and_dependencies(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = next(n.split("/")[0] for n in names if n.endswith(".dist-info/METADATA"))
        entry_points = archive.read(f"{info}/entry_points.txt").decode()
        metadata = archive.read(f"{info}/METADATA").decode()
    top = {n.split("/")[0] for n in names} - {info}
    assert top == set(PACKAGES) | {f"{m}.py" for m in MODULES}
    assert "attacks/kernels/__init__.py" in names
    packaged = sorted(Path(n).name for n in names if n.startswith("configs/") and n.endswith(".yaml"))
    assert packaged == sorted(p.name for p in (REPO / "configs").glob("*.yaml"))
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points
    required = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    for requirement in filter(None, required):
        assert f"Requires-Dist: {requirement}" in metadata


def test_installed_wheel_imports_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    targets = [target.split(":") for target in SCRIPTS.values()]
    code = "\n".join(
        [
            "import importlib, margins",
            "from margins.run.evaluate import evaluate_margins",
            "from plotting.margins import plot_margins",
            "from margins.store.results import read_report",
            "from scripts.entry_points import resolve_configs",
            f"assert all(callable(getattr(importlib.import_module(m), f)) for m, f in {targets!r})",
            "print(margins.__file__)",
            "print(resolve_configs(['fit', '--config', 'mnist_lenet'])[2])",
        ]
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    work = tmp_path / "elsewhere"
    work.mkdir()
    out = subprocess.run([sys.executable, "-c", code], cwd=work, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    module_file, config = out.stdout.split()
    assert Path(module_file).is_relative_to(site)
    assert Path(config) == site / "configs" / "mnist_lenet.yaml" and Path(config).is_file()
