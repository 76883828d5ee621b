"""README.md and docs/*.md: the README's Python runs as pasted, every relative link and file reference resolves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
CONFIG = re.compile(r"configs/[\w.-]+\.yaml")
BARE_CONFIG = re.compile(r"`(\w+\.yaml)`")
CODE = re.compile(r"(?<!`)`([^`]+)`(?!`)")
SHELL_BLOCK = re.compile(r"^```bash\n(.*?)^```", re.S | re.M)
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PRINTS = re.compile(r"#\s*prints:\s*(.+?)\s*$", re.M)
# Folders a command writes or a user supplies: paths under them are examples, not files of the clone.
NOT_IN_CLONE = {"outputs", "logs", "release", "runs", "margins/resnet50_imagenet", "data"}
RUN_FILES = {"config.yaml", "hparams.yaml"}  # files every training run writes into its folder
# Pages `scripts/reproduce.py --dataset cifar10|imagenet --docs` writes; no such reproduction has run in this clone.
WRITTEN_BY_COMMANDS = {"docs/RESULTS-cifar10.md", "docs/RESULTS-imagenet.md"}
# The release's scripts, named in docs/RESULTS.md's column "paper's figure: release" (files of LTS4/hold-me-tight).
RELEASE_SCRIPT = re.compile(r"scripts/margin_\w+\.py")


def python_blocks(page: Path) -> list[str]:
    """The fenced ```python blocks of a Markdown page, in order."""
    return PYTHON_BLOCK.findall(page.read_text())


def relative_links(page: Path) -> list[str]:
    """Link targets of a page that are neither URLs nor anchors within the page (anchor parts removed)."""
    targets = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def repo_paths(page: Path) -> list[str]:
    """Paths of the clone named in a page's inline code and shell blocks: a first component that is a folder of the
    repository (not one a run writes), or a bare `.py` name."""
    folders = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith(".")}
    found = []
    text = page.read_text()
    for code in CODE.findall(PYTHON_BLOCK.sub("", SHELL_BLOCK.sub("", text))) + SHELL_BLOCK.findall(text):
        for token in re.findall(r"[\w./*-]+", code):
            token = token.rstrip(".:")
            head = token.split("/", 1)[0]
            if "/" in token and head in folders and head not in NOT_IN_CLONE and not RELEASE_SCRIPT.fullmatch(token):
                if not any(token == skip or token.startswith(f"{skip}/") for skip in NOT_IN_CLONE):
                    found.append(token)
            elif "/" not in token and re.fullmatch(r"[a-z_]+\.py", token):
                found.append(token)
    return found


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_points_to_an_existing_file(page):
    missing = [t for t in relative_links(page) if not (page.parent / t).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_named_config_exists(page):
    text = page.read_text()
    named = set(CONFIG.findall(text)) | {f"configs/{n}" for n in BARE_CONFIG.findall(text) if n not in RUN_FILES}
    missing = sorted(n for n in named if not (REPO / n).is_file())
    assert not missing, f"{page.name} names configs that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_file_named_in_code_exists(page):
    top_level_py = {p.name for p in REPO.glob("*.py")}
    anywhere_py = {p.name for p in REPO.rglob("*.py") if ".venv" not in p.parts}
    missing = []
    for path in repo_paths(page):
        if "/" in path:
            if not any(REPO.glob(path)) and path not in WRITTEN_BY_COMMANDS:
                missing.append(path)
        elif path not in top_level_py and path not in anywhere_py:
            missing.append(path)
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_the_checks_find_what_they_check():
    """The link and path scans see the README's figure, the docs pages and the commands it names."""
    readme = REPO / "README.md"
    assert "docs/mnist_margins.png" in relative_links(readme)
    assert any(t.startswith("docs/") and t.endswith(".md") for t in relative_links(readme))
    assert {"scripts/reproduce.py", "scripts/reproduce_mnist.py", "margins/run/guard.py"} <= set(repo_paths(readme))
    assert python_blocks(readme), "the README has no Python example"


def test_the_readme_python_runs_as_pasted(mnist_root, tmp_path):
    """Each ```python block of README.md, run from the repository root as a user pastes it into `python`; a line's
    `# prints: TEXT` comment is checked against the output. About 20 s CPU (imports, 4 samples x 21 subspaces)."""
    if mnist_root.resolve() != (REPO.parent / "shared" / "data").resolve():
        pytest.skip("the README's example reads ../shared/data")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for block in python_blocks(REPO / "README.md"):
        done = subprocess.run(
            [sys.executable, "-"], input=block, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"README block failed:\n{block}\n{done.stderr[-3000:]}"
        for expected in PRINTS.findall(block):
            assert expected in done.stdout, f"expected {expected!r} in the output:\n{done.stdout}"


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", PYTHON_BLOCK.sub("", SHELL_BLOCK.sub("", page.read_text())), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_anchor_names_a_heading(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target) or "#" not in target:
            continue
        file_part, anchor = target.split("#", 1)
        linked = (page.parent / file_part) if file_part else page
        if linked.suffix == ".md" and linked.exists() and anchor not in heading_anchors(linked):
            broken.append(target)
    assert not broken, f"{page.name} links to headings that do not exist: {broken}"
