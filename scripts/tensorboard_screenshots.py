"""Regenerate the TensorBoard screenshots of docs/ in one command (the page, the window size in pixels):

    docs/tensorboard_margins.png   CUSTOM SCALARS                1600 x 780
    docs/tensorboard_scalars.png   SCALARS, the `compare` group  1600 x 470
    docs/tensorboard_images.png    IMAGES, the two card images   1600 x 820
    docs/tensorboard_hparams.png   HPARAMS                       1920 x 300

    python scripts/tensorboard_screenshots.py [--data-dir ../shared/data] [--out docs] [--runs DIR]

1. two one-epoch fits (`train.py fit`, configs/mnist_lenet.yaml then configs/mnist_flipped_lenet.yaml, 100 batches,
   `--margin.rows.num_samples 30 --margin.every_n_epochs 1`) into a temporary folder's `runs/` (4 minutes on a 2-core
   machine shared with other jobs, about 1.5 on a quiet one); `--runs DIR` skips them and shows the runs already
   in DIR instead (e.g. `--runs logs` after the quickstart);
2. TensorBoard on that folder (started in its parent with `--logdir <its name>`, so the page shows the runs as
   `mnist_lenet/version_0` under `runs`, no temporary path) on a free port, once it lists every run;
3. headless Chromium screenshots of the four pages (the charts are drawn within a virtual-time budget of a few
   seconds; the budget below leaves a wide margin);
4. the PNGs into --out, only once all were taken; TensorBoard is stopped and the temporary folder removed, also on
   failure.

Needs Chromium (`apt-get install -y chromium` on Debian/Ubuntu; `--chromium PATH` for another Chrome binary).
TensorBoard runs with PYTHONHASHSEED=0: it lists a text hyperparameter's values in Python set order, and this seed
puts `none` before `flip` in the `transform` filter, as in the committed screenshot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHROMIUM = Path("/usr/bin/chromium")
INSTALL_HINT = "apt-get install -y chromium"
CONFIGS = ("mnist_lenet", "mnist_flipped_lenet")  # in this order: the first run is orange, the second blue
FIT_FLAGS = [
    "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "100",
    "--margin.rows.num_samples", "30", "--margin.every_n_epochs", "1",
]  # fmt: skip
SHOTS = {  # file name: (page fragment, window width, height)
    "tensorboard_margins.png": ("custom_scalars", 1600, 780),
    "tensorboard_scalars.png": ("scalars", 1600, 470),
    "tensorboard_images.png": ("images", 1600, 820),
    "tensorboard_hparams.png": ("hparams", 1920, 300),
}
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
]  # fmt: skip


class ScreenshotError(RuntimeError):
    """A step failed; its one-line message is printed as `error: ...` (exit 2)."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data", help="holds MNIST/raw/")
    p.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNGs go (default docs/)")
    p.add_argument("--chromium", type=Path, default=None, help=f"Chromium binary (default: chromium on PATH or "
                   f"{DEFAULT_CHROMIUM})")  # fmt: skip
    p.add_argument("--runs", type=Path, default=None, metavar="DIR",
                   help="show the TensorBoard runs already in DIR (e.g. logs) instead of training two")  # fmt: skip
    p.add_argument("--virtual-time-budget", type=int, default=15000, metavar="MS",
                   help="Chromium's virtual time for the page to load and draw (default 15000 ms)")  # fmt: skip
    return p.parse_args(argv)


def find_chromium(explicit: Path | None = None) -> Path:
    """The Chromium binary: --chromium, else `chromium` on PATH, else /usr/bin/chromium."""
    if explicit is not None:
        candidates = [explicit]
    else:
        found = shutil.which("chromium")
        candidates = [Path(found)] if found else []
        candidates.append(DEFAULT_CHROMIUM)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    where = explicit if explicit is not None else f"chromium on PATH or {DEFAULT_CHROMIUM}"
    raise ScreenshotError(f"headless Chromium not found ({where}); install it with `{INSTALL_HINT}`")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's IHDR chunk."""
    head = path.read_bytes()[:24]
    if len(head) < 24 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        raise ScreenshotError(f"{path} is not a PNG")
    return struct.unpack(">II", head[16:24])


def run_names(runs: Path) -> list[str]:
    """The TensorBoard runs under `runs`: the folders holding event files, relative to it ("mnist_lenet/version_0")."""
    found = sorted({p.parent.relative_to(runs).as_posix() for p in runs.rglob("events.out.tfevents.*")})
    if not found:
        raise ScreenshotError(f"no TensorBoard runs (events.out.tfevents.* files) under {runs}; pass the folder "
                              f"that holds them, e.g. --runs logs after the quickstart")  # fmt: skip
    return found


def fit(config: str, data_dir: Path, runs: Path) -> None:
    argv = [sys.executable, "train.py", "fit", "--config", f"configs/{config}.yaml", "--data.data_dir", str(data_dir),
            *FIT_FLAGS, "--trainer.default_root_dir", str(runs)]  # fmt: skip
    start = time.perf_counter()
    print(f"== fit {config}", flush=True)
    if subprocess.run(argv, cwd=REPO).returncode != 0:
        raise ScreenshotError(f"`train.py fit --config configs/{config}.yaml` failed (its output is above)")
    print(f"== fit {config}: {time.perf_counter() - start:.0f} s", flush=True)


def start_tensorboard(runs: Path, port: int, log: Path) -> subprocess.Popen:
    tensorboard = Path(sys.executable).parent / "tensorboard"
    if not tensorboard.is_file():
        raise ScreenshotError(f"{tensorboard} not found (pip install tensorboard)")
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # `none` before `flip` in the HPARAMS filter (see the docstring)
    with open(log, "wb") as f:
        return subprocess.Popen([str(tensorboard), "--logdir", runs.name, "--port", str(port)], cwd=runs.parent,
                                env=env, stdout=f, stderr=subprocess.STDOUT)  # fmt: skip


def wait_for_runs(process: subprocess.Popen, port: int, runs: list[str], log: Path, timeout: float = 120.0) -> None:
    """Until TensorBoard answers and lists every run."""
    deadline = time.monotonic() + timeout
    listed: list[str] = []
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ScreenshotError(f"TensorBoard exited with {process.returncode}: {tail(log)}")
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/data/runs", timeout=5) as response:
                listed = json.loads(response.read())
            if all(run in listed for run in runs):
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise ScreenshotError(f"TensorBoard on port {port} did not list {runs} within {timeout:.0f} s (listed {listed})")


def screenshot(chromium: Path, url: str, size: tuple[int, int], out: Path, profile: Path, budget_ms: int) -> None:
    argv = [str(chromium), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
            f"--virtual-time-budget={budget_ms}", f"--screenshot={out}", url]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired as e:
        raise ScreenshotError(f"Chromium did not finish {url} within 180 s") from e
    if done.returncode != 0 or not out.is_file():
        raise ScreenshotError(f"Chromium failed on {url} (exit {done.returncode}): {tail_text(done.stderr)}")
    if png_size(out) != size:
        raise ScreenshotError(f"{out.name} is {png_size(out)}, expected {size}")


def tail(log: Path) -> str:
    return tail_text(log.read_text(errors="replace")) if log.is_file() else ""


def tail_text(text: str, lines: int = 3) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-lines:])


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(args: argparse.Namespace) -> list[Path]:
    chromium = find_chromium(args.chromium)
    start = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="tensorboard_screenshots_"))
    tensorboard = None
    try:
        runs = args.runs
        if runs is None:
            runs = workdir / "runs"
            for config in CONFIGS:
                fit(config, args.data_dir, runs)
        port, log = free_port(), workdir / "tensorboard.log"
        expected = run_names(runs)
        tensorboard = start_tensorboard(runs, port, log)
        wait_for_runs(tensorboard, port, expected, log)
        shots = []
        for name, (fragment, width, height) in SHOTS.items():
            shot = workdir / name
            screenshot(chromium, f"http://localhost:{port}/#{fragment}", (width, height), shot,
                       workdir / f"chromium_{fragment}", args.virtual_time_budget)  # fmt: skip
            shots.append(shot)
        args.out.mkdir(parents=True, exist_ok=True)
        written = []
        for shot in shots:  # only once all were taken: a failure leaves the old files in place
            target = args.out / shot.name
            shutil.copyfile(shot, target)
            written.append(target)
            print(f"wrote {target} ({shot.stat().st_size} bytes)", flush=True)
    finally:
        if tensorboard is not None:
            stop(tensorboard)
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"TensorBoard screenshots: {time.perf_counter() - start:.0f} s", flush=True)
    return written


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    args.data_dir, args.out = args.data_dir.resolve(), args.out.resolve()  # the fits run in the repository
    args.runs = args.runs.resolve() if args.runs is not None else None
    try:
        run(args)
    except ScreenshotError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
