"""The settings of a margin measurement, one frozen object per level, each setting with one name from flag to
config key to summary field, one default and one check:

- `RowSettings`: what is measured, the (sample, subspace) rows: samples (`--num-samples`, `--seed`,
  `--indices-file`) and the subspace family (`--subspace`, `--subspace-dim`, `--subspace-step`; random ones:
  `--count`, `--subspace-seed`, `--method`, `--bases`).
- `AttackSettings`: how, the estimator and its own settings, and what fixes a row's bits (chunk rows, precision,
  kernels).
- `RunSettings`: where, the processes and the run policy (devices, threads, workers, progress, overwrite).

The commands read them from their flags (`cli.margin_flags`), the callback from its config (`margin.rows.*`,
`margin.attack.*`), the Python API takes them as objects. Code that receives one never changes it: a variant is
`dataclasses.replace(settings, ...)`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
from frequency.families import FAMILY_KINDS, build_subspace_family
from frequency.subspaces import SubspaceFamily
from margins.store.names import bound, folder_suffix

if TYPE_CHECKING:
    from datamodules import FrequencyDataModule

DEFAULT_NUM_SAMPLES = 100  # samples a margin evaluation draws when none are given (the paper's)


def select_indices(dataset_size: int, num_samples: int, seed: int) -> np.ndarray:
    """`num_samples` distinct dataset indices drawn uniformly with `np.random.default_rng(seed)`.

    Returns int64 [num_samples], SORTED ascending (samples then appear in dataset order; the chosen set
    depends only on the three arguments). Save the result (indices.npy) to reproduce a run exactly.
    """
    for name, value in (("dataset_size", dataset_size), ("num_samples", num_samples), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an integer, got {value!r}")
    if dataset_size <= 0:
        raise ValueError(f"dataset_size must be positive, got {dataset_size} (is the dataset empty?)")
    if not 0 < num_samples <= dataset_size:
        raise ValueError(
            f"num_samples must be between 1 and the dataset size {dataset_size}, got {num_samples}; "
            "request fewer samples or use a larger split"
        )
    rng = np.random.default_rng(int(seed))
    return np.sort(rng.choice(int(dataset_size), size=int(num_samples), replace=False)).astype(np.int64)


def load_indices(path: str | Path, dataset_size: int) -> np.ndarray:
    """Dataset indices from a `.npy` file holding a 1-D integer array; returns int64 [N] in the file's order.

    Raises FileNotFoundError for a missing file and ValueError for an unreadable file, a wrong dtype or
    shape, an empty array, indices outside `[0, dataset_size)` or duplicate indices (the message lists them).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"indices file {path} does not exist; give a .npy file of dataset indices")
    try:
        indices = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot read {path} as a .npy array of indices ({error}); save one with np.save") from error
    if not isinstance(indices, np.ndarray):
        raise ValueError(f"{path} is not a single .npy array (an .npz archive?); save one array with np.save")
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices in {path} must be integers, got dtype {indices.dtype}; save an int64 array")
    if indices.ndim != 1 or indices.size == 0:
        raise ValueError(f"indices in {path} must be a non-empty 1-D array, got shape {indices.shape}")
    indices = indices.astype(np.int64)
    outside = indices[(indices < 0) | (indices >= dataset_size)]
    if outside.size:
        raise ValueError(
            f"{outside.size} indices in {path} are outside [0, {dataset_size}) for this dataset, e.g. "
            f"{outside[:5].tolist()}; were they made for another split?"
        )
    values, counts = np.unique(indices, return_counts=True)
    duplicates = values[counts > 1]
    if duplicates.size:
        raise ValueError(f"indices in {path} contain duplicates: {duplicates[:10].tolist()}; each sample once")
    return indices


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
        unsized = self.subspace in ("full", "basis") and (self.subspace_dim, self.subspace_step) != (None, None)
        raise_first([
            (self.num_samples < 1, f"num_samples must be >= 1 (--num-samples), got {self.num_samples}"),
            (self.seed < 0, f"seed must be >= 0 (--seed), got {self.seed}"),
            (self.subspace not in FAMILY_KINDS, f"unknown subspace kind {self.subspace!r} for subspace (--subspace); "
             f"choose one of {', '.join(FAMILY_KINDS)}"),
            (unsized, "subspace_dim/subspace_step (--subspace-dim/--subspace-step) do not apply to "
             f"{self.subspace} subspaces; leave them unset"),
            (self.subspace_step is not None and self.subspace_step < 1,
             f"subspace_step={self.subspace_step} (--subspace-step) must be >= 1"),
            (self.count is not None and self.count < 1,
             f"count={self.count} (--count): the number of random subspaces must be >= 1"),
            (self.method not in RANDOM_METHODS,
             f"method must be one of {', '.join(RANDOM_METHODS)} (--method), got {self.method!r}"),
        ])  # fmt: skip

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


def raise_first(problems: list[tuple[bool, str]]) -> None:
    """InputError with the message of the first problem that holds (each: a condition and the line naming the
    setting, its flag and the value)."""
    for holds, message in problems:
        if holds:
            raise InputError(message)


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
        raise_first([
            (self.max_iter < 1, f"max_iter must be >= 1 (--max-iter), got {self.max_iter}"),
            (self.chunk_rows is not None and self.chunk_rows < 1,
             f"chunk_rows must be >= 1 (--chunk-rows), got {self.chunk_rows}"),
            (not np.isfinite(self.overshoot) or self.overshoot < 0,
             f"overshoot must be a finite number >= 0 (--overshoot), got {self.overshoot}"),
            (self.num_candidates < 2, f"num_candidates must be >= 2 (--num-candidates), got {self.num_candidates}"),
            (self.dtype is not None and self.dtype not in DTYPES,
             f"dtype must be one of {', '.join(DTYPES)} (--dtype), got {self.dtype!r}"),
            (self.estimator not in ESTIMATORS,
             f"estimator must be one of {', '.join(ESTIMATORS)} (--estimator), got {self.estimator!r}"),
            (self.fmn_steps < 1, f"fmn_steps must be >= 1 (--fmn-steps), got {self.fmn_steps}"),
            (self.certify_method not in CERTIFY_METHODS,
             f"certify_method must be one of {', '.join(CERTIFY_METHODS)} (--certify-method), got "
             f"{self.certify_method!r}"),
            (self.kernels not in ("auto", "off"),
             f"kernels must be 'auto' or 'off' (--kernels), got {self.kernels!r} (kernels: {', '.join(KERNELS)})"),
        ])  # fmt: skip

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
        (`margins.store.names.folder_suffix`)."""
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
        raise_first([
            (self.num_workers < 0, f"num_workers must be >= 0 (--num-workers), got {self.num_workers}"),
            (self.threads is not None and self.threads < 1, f"threads must be >= 1 (--threads), got {self.threads}"),
            (self.num_nodes is not None and self.num_nodes < 1,
             f"num_nodes must be >= 1 (--num-nodes), got {self.num_nodes}"),
        ])  # fmt: skip

    def resolved(self, processes_per_node: int) -> RunSettings:
        """These settings with `threads` given (`default_threads` where None)."""
        threads = default_threads(processes_per_node) if self.threads is None else self.threads
        return dataclasses.replace(self, threads=threads)


def default_threads(processes_per_node: int) -> int:
    """CPU threads per process by default: the cores this process may use, shared among the processes on its node
    (at least 1). On idle cores two threads measured faster than one and than two processes (docs/ENGINE.md)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // max(1, processes_per_node))
