"""The settings of a margin measurement, one frozen object per level, each setting with one name from flag to
config key to summary field, one default and one check:

- `RowSettings`: what is measured, the (sample, subspace) rows: samples (`--num-samples`, `--seed`,
  `--indices-file`) and the subspace family (`--subspace`, `--subspace-dim`, `--subspace-step`; random ones:
  `--count`, `--subspace-seed`, `--method`, `--bases`).
- `AttackSettings`: how, the estimator and its own settings, and what fixes a row's bits (chunk rows, precision,
  kernels).
- `RunSettings`: where, the processes and the run policy (devices, threads, workers, progress, overwrite).

The commands read them from their flags (`margins.cli`), the callback from its config (`margin.rows.*`,
`margin.attack.*`), the Python API takes them as objects. Code that receives one never changes it: a variant is
`dataclasses.replace(settings, ...)`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from attacks.certify import SubspaceCertifier, certify_network
from attacks.certify.certifier import METHODS as CERTIFY_METHODS
from attacks.deepfool import SubspaceDeepFool
from attacks.estimator import MarginEstimator
from attacks.fmn import SubspaceFMN
from attacks.kernels import KERNELS
from common.errors import InputError
from datamodules import FrequencyDataModule
from frequency.families import FAMILY_KINDS, build_subspace_family
from frequency.subspaces import SubspaceFamily
from margins.measure import DEFAULT_NUM_SAMPLES, load_indices, select_indices
from margins.names import bound, folder_suffix

RANDOM_METHODS = ("auto", "qr", "hartley")


@dataclass(frozen=True)
class RowSettings:
    """Which (sample, subspace) rows are measured.

    Samples: `num_samples` test samples drawn with `seed` (sorted), or the dataset indices in the .npy file
    `indices_file` (in order). Subspaces: `subspace` "dct" (diagonal DCT blocks, the paper's), "full" (the whole
    input space, one row), "grid" (DCT blocks on a 2-D grid of the spectrum), "random" (seeded random subspaces of
    the DCT blocks' dimension) or "basis" (bases from files); `subspace_dim` the block side k and `subspace_step`
    the block step, or the grid's stride (None: the dataset's, for grids k // 2); random subspaces: `count` (None:
    as many as DCT blocks), `subspace_seed`, `method`; `bases`: .npy/.pt files of [D, k] orthonormal bases.
    """

    num_samples: int = DEFAULT_NUM_SAMPLES
    seed: int = 0
    indices_file: str | None = None
    subspace: str = "dct"
    subspace_dim: int | None = None
    subspace_step: int | None = None
    count: int | None = None
    subspace_seed: int = 0
    method: str = "auto"
    bases: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "bases", tuple(str(b) for b in self.bases))  # a list from a config or the API

    def check(self) -> None:
        """InputError naming the setting (and its flag) when it is out of range; the rest needs the images
        (`family`)."""
        if self.num_samples < 1:
            raise InputError(f"num_samples must be >= 1 (--num-samples), got {self.num_samples}")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0 (--seed), got {self.seed}")
        if self.subspace not in FAMILY_KINDS:
            raise InputError(
                f"unknown subspace kind {self.subspace!r} for subspace (--subspace); choose one of "
                f"{', '.join(FAMILY_KINDS)}"
            )
        if self.subspace in ("full", "basis") and (self.subspace_dim is not None or self.subspace_step is not None):
            raise InputError(
                f"subspace_dim/subspace_step (--subspace-dim/--subspace-step) do not apply to {self.subspace} "
                "subspaces; leave them unset"
            )
        if self.subspace_step is not None and self.subspace_step < 1:
            raise InputError(f"subspace_step={self.subspace_step} (--subspace-step) must be >= 1")
        if self.count is not None and self.count < 1:
            raise InputError(f"count={self.count} (--count): the number of random subspaces must be >= 1")
        if self.method not in RANDOM_METHODS:
            raise InputError(f"method must be one of {', '.join(RANDOM_METHODS)} (--method), got {self.method!r}")

    def family(self, dm: FrequencyDataModule) -> SubspaceFamily:
        """The family these settings name for the images of `dm` (its `image_shape` [C, H, W]; its
        `subspace_block` and `subspace_step`, the paper's, where these settings leave them unset); InputError on
        bad settings."""
        self.check()
        image_shape, dataset = tuple(dm.image_shape), getattr(dm, "name", type(dm).__name__)
        block = dm.subspace_block if self.subspace_dim is None else self.subspace_dim
        if self.subspace_step is not None:
            step = self.subspace_step
        else:
            step = max(1, block // 2) if self.subspace == "grid" else dm.subspace_step
        side = min(image_shape[1:])
        if self.subspace not in ("full", "basis") and not 1 <= block <= side:
            raise InputError(
                f"subspace_dim={block} (--subspace-dim) does not fit the {image_shape[1]}x{image_shape[2]} images of "
                f"{dataset}: use 1..{side}"
            )
        bases = list(self.bases) or None
        return build_subspace_family(
            self.subspace, tuple(image_shape), block, step, count=self.count, seed=self.subspace_seed,
            method=self.method, bases=bases
        )  # fmt: skip

    def indices(self, size: int, dataset: str) -> np.ndarray:
        """int64 [N] dataset indices: the file's (in order) or `num_samples` drawn with `seed` (sorted), for a test
        split of `size` samples. Errors name the setting and its flag: `num_samples=500 (--num-samples) is not in
        [1, 100]`."""
        self.check()
        if self.indices_file is not None:
            try:
                return load_indices(self.indices_file, size)
            except (ValueError, FileNotFoundError) as err:
                raise InputError(" ".join(str(err).split())) from err
        if not self.num_samples <= size:
            raise InputError(
                f"num_samples={self.num_samples} (--num-samples) is not in [1, {size}]: the {dataset} test split has "
                f"{size} samples"
            )
        return select_indices(size, self.num_samples, self.seed)

    def record(self) -> dict[str, Any]:
        """What a result folder records of these settings beyond the family's own description
        (`margins.inputs.describe_family`): the seed, the indices file and the bases files (absolute paths)."""
        out: dict[str, Any] = {"seed": self.seed, "indices_file": _absolute(self.indices_file)}
        if self.bases:
            out["bases"] = [_absolute(b) for b in self.bases]
        return out


def _absolute(path: str | None) -> str | None:
    return None if path is None else str(Path(path).expanduser().resolve())


DTYPES = {"float32": torch.float32, "float64": torch.float64}
ESTIMATORS = ("deepfool", "fmn", "certify")
DEFAULT_DTYPES = {"certify": "float64"}  # an estimator's precision when none is given (else float32)
DEFAULT_CHUNK_ROWS = 512  # rows per chunk when none is given (`AttackSettings.default_chunk_rows`)
SMALL_CHUNK_ROWS = 64  # the same for ImageNet and for the certifier


@dataclass(frozen=True)
class AttackSettings:
    """The margin estimator and its settings, the chunk size, and the engine's precision and kernels.

    estimator: "deepfool" (the paper's, `attacks.deepfool.SubspaceDeepFool`: `overshoot`, `max_iter`,
    `num_candidates`, the release's defaults), "fmn" (minimum-norm, `attacks.fmn.SubspaceFMN`: `fmn_steps` steps,
    `num_candidates` for its first step) or "certify" (certified lower bounds, `attacks.certify.SubspaceCertifier`
    with `certify_method`). `chunk_rows` (sample, subspace) rows are attacked as one batch and committed as one file:
    it bounds memory and fixes the float results (keep it to resume); None: `default_chunk_rows`. `dtype`:
    None is float64 for the certifier, float32 for the attacks. `kernels`: "auto" or "off" (`attacks.kernels`;
    the attacks' only). Frozen: a variant is `dataclasses.replace(settings, ...)`, never a change to the caller's."""

    overshoot: float = 0.02
    max_iter: int = 100
    num_candidates: int = 10
    chunk_rows: int | None = None
    dtype: str | None = None
    kernels: str = "auto"
    estimator: str = "deepfool"
    fmn_steps: int = 200
    certify_method: str = "crown"

    @property
    def precision(self) -> str:
        """`dtype`, or the estimator's default precision where it is None."""
        return self.dtype or DEFAULT_DTYPES.get(self.estimator, "float32")

    def check(self) -> None:
        """InputError naming the parameter when a setting is out of range."""
        if self.max_iter < 1:
            raise InputError(f"max_iter must be >= 1 (--max-iter), got {self.max_iter}")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise InputError(f"chunk_rows must be >= 1 (--chunk-rows), got {self.chunk_rows}")
        if not np.isfinite(self.overshoot) or self.overshoot < 0:
            raise InputError(f"overshoot must be a finite number >= 0 (--overshoot), got {self.overshoot}")
        if self.num_candidates < 2:
            raise InputError(f"num_candidates must be >= 2 (--num-candidates), got {self.num_candidates}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise InputError(f"dtype must be one of {', '.join(DTYPES)} (--dtype), got {self.dtype!r}")
        if self.estimator not in ESTIMATORS:
            raise InputError(f"estimator must be one of {', '.join(ESTIMATORS)} (--estimator), got {self.estimator!r}")
        if self.fmn_steps < 1:
            raise InputError(f"fmn_steps must be >= 1 (--fmn-steps), got {self.fmn_steps}")
        if self.certify_method not in CERTIFY_METHODS:
            raise InputError(
                f"certify_method must be one of {', '.join(CERTIFY_METHODS)} (--certify-method), got "
                f"{self.certify_method!r}"
            )
        if self.kernels not in ("auto", "off"):
            raise InputError(
                f"kernels must be 'auto' or 'off' (--kernels), got {self.kernels!r} (kernels: {', '.join(KERNELS)})"
            )

    def record(self) -> dict[str, Any]:
        """The settings a result folder records, all in the fingerprint a resume must match: the estimator and its
        own settings (DeepFool's also at the top level, as folders have always held them; an FMN run carries no
        DeepFool setting), the chunk size, the precision and the kernels."""
        own: dict[str, Any] = {"kernels": self.kernels}
        if self.estimator == "deepfool":
            own.update(overshoot=self.overshoot, max_iter=self.max_iter, num_candidates=self.num_candidates)
        elif self.estimator == "fmn":
            own.update(num_candidates=self.num_candidates)
        else:
            own = {}  # the certifier runs the model as written: no kernels
        return {"estimator": self.estimator, "estimator_settings": self.engine().settings(), **own,
                "chunk_rows": self.chunk_rows, "dtype": self.precision, "bound": bound(self.estimator)}  # fmt: skip

    def default_chunk_rows(self, dataset: str = "") -> int:
        """Rows per chunk when none is given: `SMALL_CHUNK_ROWS` (64) for ImageNet (memory) and for the certifier (a
        certified row costs hundreds of DeepFool's: progress and resume stay fine-grained), else
        `DEFAULT_CHUNK_ROWS` (512)."""
        return SMALL_CHUNK_ROWS if dataset == "imagenet" or self.estimator == "certify" else DEFAULT_CHUNK_ROWS

    def resolved(self, dataset: str = "") -> AttackSettings:
        """These settings with `chunk_rows` and `dtype` given (`default_chunk_rows(dataset)`, `precision` where
        None): a copy, never `self` changed."""
        rows = self.default_chunk_rows(dataset) if self.chunk_rows is None else self.chunk_rows
        return dataclasses.replace(self, chunk_rows=rows, dtype=self.precision)

    def check_model(self, model: nn.Module, image_shape: tuple[int, ...]) -> None:
        """The certifier's layers check before anything is written: `UnsupportedLayerError` (an InputError) naming
        the first layer it cannot bound; nothing for the attacks, which run any differentiable model."""
        if self.estimator == "certify":
            certify_network(model, tuple(image_shape), DTYPES[self.precision])

    def default_folder(self, folder: Path) -> Path:
        """A default result folder named by the estimator: as given for DeepFool, `<folder>_<estimator>` otherwise
        (`margins.names.folder_suffix`)."""
        return folder.with_name(folder.name + folder_suffix(self.estimator))

    def engine(self) -> MarginEstimator:
        """The estimator these settings describe."""
        batch, dtype = self.chunk_rows or self.default_chunk_rows(), DTYPES[self.precision]
        if self.estimator == "certify":  # rows bounded together: `batch`, fewer where memory needs (its docs)
            return SubspaceCertifier(method=self.certify_method, batch_size=batch, dtype=dtype)
        if self.estimator == "fmn":
            return SubspaceFMN(steps=self.fmn_steps, num_candidates=self.num_candidates, batch_size=batch, dtype=dtype,
                               kernels=self.kernels)  # fmt: skip
        return SubspaceDeepFool(overshoot=self.overshoot, max_iter=self.max_iter, num_candidates=self.num_candidates,
                                batch_size=batch, dtype=dtype, kernels=self.kernels)  # fmt: skip


@dataclass(frozen=True)
class RunSettings:
    """Processes and run policy: Lightning's `accelerator`, `devices` (None: from torchrun's environment, else 1),
    `num_nodes` and `strategy`; DataLoader workers reading samples; whether an earlier evaluation in the folder is
    discarded (`overwrite`); a progress bar; CPU intra-op threads per process (None: `default_threads`, the cores
    this process may use shared among the processes on its node; float bits depend on the count, so it is part of a
    CPU run); glibc keeping freed memory for reuse (`common.memory`, process-wide). Frozen, as `AttackSettings`."""

    accelerator: str = "auto"
    devices: int | str | None = None
    num_nodes: int | None = None
    strategy: str = "auto"
    num_workers: int = 0
    overwrite: bool = False
    progress: bool = True
    threads: int | None = None
    keep_freed_memory: bool = False

    def check(self) -> None:
        """InputError naming the parameter (and its flag) when a setting is out of range."""
        if self.num_workers < 0:
            raise InputError(f"num_workers must be >= 0 (--num-workers), got {self.num_workers}")
        if self.threads is not None and self.threads < 1:
            raise InputError(f"threads must be >= 1 (--threads), got {self.threads}")
        if self.num_nodes is not None and self.num_nodes < 1:
            raise InputError(f"num_nodes must be >= 1 (--num-nodes), got {self.num_nodes}")

    def resolved(self, processes_per_node: int) -> RunSettings:
        """These settings with `threads` given (`default_threads` where None)."""
        threads = default_threads(processes_per_node) if self.threads is None else self.threads
        return dataclasses.replace(self, threads=threads)


def default_threads(processes_per_node: int) -> int:
    """CPU threads per process by default: the cores this process may use, shared among the processes on its node
    (at least 1). On idle cores two threads measured faster than one and than two processes (docs/ENGINE.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes_per_node))
