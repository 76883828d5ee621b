"""Time one engine call in a fresh process, with the code of any checkout: `benchmarks/bench_deepfool.py` uses it to
set another version of the engine (`--baseline DIR`) or another malloc policy beside this one, in the same run.

    python benchmarks/engine_timer.py --repo DIR --case CASE.pt --engine '{"batch_size": 512}' --out MARGINS.pt
        [--threads 1] [--keep-freed-memory]

CASE.pt (written by bench_deepfool.py): {"model": the pickled nn.Module, "x": [N, C, H, W], "family": ["dct", shape,
block, step] or ["full", shape]}. The model's classes must import from DIR (this project's zoo does). Prints one JSON
line {"cpu": s, "wall": s} (CPU seconds of this process, wall seconds; CUDA synchronised) and saves the margins
[S, N] to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repo", required=True, help="checkout whose attacks/ and frequency/ are timed")
    parser.add_argument("--case", required=True)
    parser.add_argument("--engine", default="{}", help="SubspaceDeepFool keyword arguments, JSON")
    parser.add_argument("--out", required=True)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep-freed-memory", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, args.repo)
    import torch

    torch.set_num_threads(args.threads)
    with keep_freed_memory() if args.keep_freed_memory else contextlib.nullcontext():
        time_engine(args)


def keep_freed_memory() -> contextlib.AbstractContextManager:
    """The checkout's block that keeps freed memory (`common.memory.KeepFreedMemory`); older checkouts have a
    process-wide call instead, made here."""
    import common.memory as memory

    if hasattr(memory, "KeepFreedMemory"):
        return memory.KeepFreedMemory()
    memory.keep_freed_memory()
    return contextlib.nullcontext()


def time_engine(args: argparse.Namespace) -> None:
    import torch

    from attacks.deepfool import SubspaceDeepFool
    from frequency import DCTBlockSubspaces, FullSpace

    case = torch.load(args.case, weights_only=False)
    model, x, (kind, *spec) = case["model"], case["x"], case["family"]
    family = FullSpace(tuple(spec[0])) if kind == "full" else DCTBlockSubspaces(tuple(spec[0]), spec[1], spec[2])
    attack = SubspaceDeepFool(**json.loads(args.engine))
    cuda = x.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    cpu, wall = time.process_time(), time.perf_counter()
    result = attack(model, x, family)
    if cuda:
        torch.cuda.synchronize()
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    torch.save(result.margins.cpu(), args.out)
    print(json.dumps({"cpu": cpu, "wall": wall}))


if __name__ == "__main__":
    main()
