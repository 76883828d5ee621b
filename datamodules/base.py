"""The base LightningDataModules: frequency transforms, normalisation, splits, seeded dataloaders.

`FrequencyDataModule` (and `TensorDataModule` for in-memory datasets) describe a dataset completely: its
hyperparameters (`hparams`, Lightning's `save_hyperparameters`), image shape, classes, DCT subspace settings,
normalisation, train/val/test datasets and dataloaders. Each dataset subclasses them once
(`datamodules.mnist.MNISTDataModule`, ...) and adds its download in `prepare_data`.

Frequency transforms (the paper's and its supplementary material's), applied to images `[C, H, W]` (or batches)
in the model's input space:

- ``none``: pixels in [0, 1].
- ``flip``: `IDCT(reverse(DCT(x)))` over both frequency axes (`frequency.flip`).
- ``low_pass``: keep the `bandwidth x bandwidth` lowest-frequency DCT block of every channel (2-D block, the
  paper's low-pass). The original release, on 4-D batches, kept rows < bandwidth of *every* column (only the
  vertical frequency was filtered) while on single images it kept the 2-D block.
- ``low_pass_rows_release``: that batched release behaviour, DCT rows < bandwidth of every column; only for
  comparisons with the release's low-pass models.
- ``high_pass``: remove the lowest `bandwidth x bandwidth` block (`x - low_pass(x)`; a supplementary high-pass).
- ``high_pass_last_block``: keep only the highest-frequency `bandwidth x bandwidth` block (DCT rows and columns
  >= side - bandwidth; the paper's other supplementary high-pass).

Normalisation (`normalization() -> models.normalization.Normalize`, applied inside the model):

- ``none``: the dataset's per-channel mean and std.
- ``flip``: mean image = flip of the constant image filled with the per-channel mean; same std.
- the filters (``low_pass``, ``low_pass_rows_release``, ``high_pass``, ``high_pass_last_block``): in-memory
  datasets use the per-channel mean and std of the *filtered training
  samples* (the ones fitted on; with `val_split > 0` the held-out samples are excluded), computed lazily once.
  Streaming datasets (ImageNet) use the transformed constant mean image and the standard std instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from common.errors import InputError
from frequency import FILTERS, DCTBlockSubspaces, flip
from models.normalization import Normalize

TRANSFORMS = ("none", "flip", *FILTERS)  # none, flip, low_pass, low_pass_rows_release, high_pass, high_pass_last_block
CHUNK = 4096  # images per chunk when transforming or reducing in-memory tensors


class DatasetNotFoundError(InputError, FileNotFoundError):
    """The data files are not where the datamodule looked: `problem` names the directory and the layout it
    expects, `fix` how to get them in train.py's flags (the message: "<problem> Fix: <fix>"); a command with other
    flags says its own fix after `problem`."""

    def __init__(self, problem: str, fix: str = ""):
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)
        self.problem, self.fix = problem, fix


class FrequencyTransform:
    """Picklable transform applying `kind` (one of TRANSFORMS) to `x: [..., C, H, W]` float tensors.

    Used once on whole in-memory tensors and on the fly (after ToTensor) for streamed datasets.
    """

    def __init__(self, kind: str = "none", bandwidth: int = 16):
        check_transform(kind)
        self.kind, self.bandwidth = kind, int(bandwidth)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "flip":
            return flip(x)
        if self.kind in FILTERS:
            return FILTERS[self.kind](x, self.bandwidth)
        return x

    def __repr__(self) -> str:
        extra = f", bandwidth={self.bandwidth}" if self.kind in FILTERS else ""
        return f"FrequencyTransform(kind={self.kind!r}{extra})"


def check_transform(kind: str) -> None:
    if kind not in TRANSFORMS:
        raise ValueError(f"unknown frequency transform {kind!r}; choose one of {', '.join(TRANSFORMS)}")


def transform_in_chunks(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = CHUNK
) -> torch.Tensor:
    """Apply `fn` to `x: [N, C, H, W]` in place, `chunk` images at a time (bounds temporary memory); returns x."""
    for start in range(0, x.shape[0], chunk):
        x[start : start + chunk] = fn(x[start : start + chunk])
    return x


def channel_stats(x: torch.Tensor, chunk: int = CHUNK) -> tuple[list[float], list[float]]:
    """Per-channel mean and (population) std of `x: [N, C, H, W]`, accumulated in float64 over chunks."""
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    total_sq = torch.zeros(x.shape[1], dtype=torch.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].double()
        total += part.sum(dim=(0, 2, 3))
        total_sq += part.square().sum(dim=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    var = (total_sq / count - mean.square()).clamp_min(0.0)
    return mean.tolist(), var.sqrt().tolist()


def split_indices(n: int, val_split: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic hold-out: (train indices, val indices), both sorted, `val_split` of them for validation."""
    if not 0 <= val_split < n:
        raise ValueError(f"val_split={val_split} must be in [0, {n}) for a training split of {n} samples")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    return perm[val_split:].sort().values, perm[:val_split].sort().values


def build_from(registry: Mapping[str, type], dataset: str, kwargs: Mapping[str, Any]) -> Any:
    """`registry[dataset](**kwargs)`; keys starting with "_" (LightningCLI's `_class_path`, `_instantiator` in
    checkpoint hparams) are ignored. ValueError for an unknown name."""
    key = dataset.lower().replace("-", "")
    if key not in registry:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(registry)}")
    return registry[key](**{k: v for k, v in kwargs.items() if not k.startswith("_")})


class FrequencyDataModule(L.LightningDataModule):
    """A dataset in the model's input space; base of the datamodules (LightningCLI's `--data` base class).
    Subclasses set `name` (registry key), `MEAN`/`STD` (per channel), `subspace_block`/`subspace_step` (the paper's
    DCT block settings), and implement `image_shape`, `num_classes` and datasets. `hparams` records `dataset` and
    every constructor argument.

    Args:
        data_dir: directory holding the dataset (layout per subclass).
        transform: frequency transform of the inputs, one of TRANSFORMS (module docstring).
        bandwidth: block side of the filters (DCT indices < bandwidth are the low block, >= side - bandwidth the
            last one).
        batch_size: training batch size per device; eval_batch_size: evaluation batch size (default batch_size).
        num_workers: DataLoader workers; pin_memory: default True when CUDA is available.
        download: allow `prepare_data` to download (never done in `setup`).
        val_split: 0 validates on the test split (as the release); n > 0 holds out n training samples.
        seed: seed of the hold-out split and of the training shuffle order.
    """

    name: str = ""
    MEAN: tuple[float, ...] = ()
    STD: tuple[float, ...] = ()
    subspace_block: int = 8
    subspace_step: int = 1

    def __init__(
        self,
        data_dir: str = "data",
        transform: str = "none",
        bandwidth: int = 16,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        download: bool = False,
        val_split: int = 0,
        seed: int = 0,
        pin_memory: bool | None = None,
        **recorded: Any,
    ):
        unknown = set(recorded) - {"dataset"}  # `dataset` is recorded in the hparams; load_from_checkpoint passes it
        if unknown:
            raise TypeError(f"{type(self).__name__} got unexpected arguments {sorted(unknown)}")
        super().__init__()
        self.save_hyperparameters()
        # a rebuild from a checkpoint passes `dataset` among the base's arguments: drop it so that it comes last again
        # (hparams are updated in place), as in a fresh datamodule
        self.hparams.pop("dataset", None)
        self.save_hyperparameters(self._recorded_hparams())
        check_transform(transform)
        if transform in FILTERS and not 0 < bandwidth <= min(self.image_shape[1:]):
            raise ValueError(
                f"bandwidth must be in [1, {min(self.image_shape[1:])}] for {self.name} images of shape "
                f"{self.image_shape}, got {bandwidth}"
            )
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise ValueError(
                f"batch sizes must be positive, got batch_size={batch_size}, eval_batch_size={eval_batch_size}"
            )
        if val_split < 0:
            raise ValueError(f"val_split must be >= 0 (0 validates on the test split), got {val_split}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 loads the data in the training process), got {num_workers}")
        self.frequency_transform = FrequencyTransform(transform, bandwidth)
        self._norm_stats: tuple[Any, Any] | None = None

    def _recorded_hparams(self) -> dict[str, Any]:
        """The registry name (so checkpoints, which store dict(hparams), say which dataset was used) and the
        canonical values of the constructor arguments."""
        return {"dataset": self.name, **self._canonical_hparams(dict(self.hparams))}

    @classmethod
    def argument_names(cls) -> set[str]:
        """Every constructor argument, including those a subclass forwards to its bases through `**kwargs`."""
        names: set[str] = set()
        for klass in cls.__mro__:
            if isinstance(klass, type) and issubclass(klass, FrequencyDataModule) and "__init__" in vars(klass):
                parameters = inspect.signature(klass.__init__).parameters.values()
                names |= {p.name for p in parameters if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        return names - {"self"}

    def _canonical_hparams(self, hparams: dict[str, Any]) -> dict[str, Any]:
        """Hook: canonical types of hyperparameters (e.g. CLI lists -> tuples), so they compare equal to the
        values linked into the model's hparams."""
        return hparams

    # ---- description of the data -------------------------------------------------------------------------
    @property
    def data_path(self) -> Path:
        return Path(self.hparams.data_dir).expanduser()

    IMAGE_SHAPE: tuple[int, int, int] | None = None  # fixed by datasets whose images have one size
    NUM_CLASSES: int | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Model input shape `(C, H, W)`."""
        if self.IMAGE_SHAPE is None:
            raise NotImplementedError(f"{type(self).__name__} must define IMAGE_SHAPE or image_shape")
        return self.IMAGE_SHAPE

    @property
    def num_classes(self) -> int:
        if self.NUM_CLASSES is None:
            raise NotImplementedError(f"{type(self).__name__} must define NUM_CLASSES or num_classes")
        return self.NUM_CLASSES

    def subspaces(self, device: torch.device | str = "cpu") -> DCTBlockSubspaces:
        """The DCT block subspace family of the paper for this dataset's images."""
        return DCTBlockSubspaces(self.image_shape, self.subspace_block, self.subspace_step, device)

    # ---- normalisation -----------------------------------------------------------------------------------
    def normalization(self) -> Normalize:
        """`Normalize` for the model's input space (see module docstring); statistics computed once, cached."""
        if self._norm_stats is None:
            self._norm_stats = self._normalization_stats()
        mean, std = self._norm_stats
        return Normalize(mean, std, self.image_shape)

    def _normalization_stats(self) -> tuple[Any, Any]:
        """(mean: per-channel list or [C, H, W] image, std: per-channel list); default: transformed mean image."""
        if self.hparams.transform == "none":
            return list(self.MEAN), list(self.STD)
        return self._transformed_mean_image(), list(self.STD)

    def _transformed_mean_image(self) -> torch.Tensor:
        constant = torch.tensor(self.MEAN, dtype=torch.float64).reshape(-1, 1, 1).expand(self.image_shape)
        return self.frequency_transform(constant.clone()).float()

    # ---- datasets ----------------------------------------------------------------------------------------
    @property
    def train_set(self) -> Dataset:
        raise NotImplementedError

    @property
    def val_set(self) -> Dataset:
        """Validation data: the test split when `val_split == 0`, else the held-out training samples."""
        raise NotImplementedError

    @property
    def test_set(self) -> Dataset:
        raise NotImplementedError

    def margin_dataset(self) -> Dataset:
        """Test split in the model's input space (transformed, unnormalised, eval transforms); items (x, y)."""
        return self.test_set

    # ---- Lightning -----------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Load (never download) what `stage` needs; raises DatasetNotFoundError if the files are missing."""
        if stage in (None, "fit"):
            _ = self.train_set, self.val_set
        if stage == "validate":
            _ = self.val_set
        if stage in (None, "test", "predict"):
            _ = self.test_set

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        hp = self.hparams
        pin = torch.cuda.is_available() if hp.pin_memory is None else hp.pin_memory
        # seeded shuffle (single device; under DDP Lightning's DistributedSampler replaces it). The generator
        # advances across epochs; if loaders are rebuilt every epoch, the epoch keeps the orders distinct.
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        generator = torch.Generator().manual_seed(int(hp.seed) + 1_000_003 * epoch) if train else None
        return DataLoader(
            dataset,
            batch_size=hp.batch_size if train else (hp.eval_batch_size or hp.batch_size),
            shuffle=train,
            generator=generator,
            num_workers=hp.num_workers,
            pin_memory=pin,
            persistent_workers=hp.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


class TensorDataModule(FrequencyDataModule):
    """Datasets held in memory as float tensors `[N, C, H, W]`, frequency-transformed once at load time.

    Subclasses implement `_load_split(train) -> (x: [N, C, H, W] float32, y: [N] int64)` (untransformed).
    """

    # caches, filled lazily (no __init__ here, so subclasses expose the base signature to CLIs)
    _train: tuple[torch.Tensor, torch.Tensor] | None = None
    _val: tuple[torch.Tensor, torch.Tensor] | None = None
    _test: tuple[torch.Tensor, torch.Tensor] | None = None

    def _load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _load_transformed(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self._load_split(train)
        if tuple(x.shape[1:]) != self.image_shape or x.shape[0] != y.shape[0]:
            raise RuntimeError(
                f"{self.name} {'train' if train else 'test'} split has images {tuple(x.shape)} and labels "
                f"{tuple(y.shape)}; expected [N, *{self.image_shape}] and [N]"
            )
        x = x.float().contiguous()
        return transform_in_chunks(self.frequency_transform, x), y.long()

    def _ensure_fit_tensors(self) -> None:
        if self._train is not None:
            return
        x, y = self._load_transformed(train=True)
        if self.hparams.val_split > 0:
            train_idx, val_idx = split_indices(x.shape[0], self.hparams.val_split, self.hparams.seed)
            self._val = (x[val_idx], y[val_idx])
            x, y = x[train_idx], y[train_idx]
        self._train = (x, y)

    @property
    def train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformed training samples actually fitted on (excludes the hold-out): x [N, C, H, W], y [N]."""
        self._ensure_fit_tensors()
        return self._train

    @property
    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Transformed test split: x [N, C, H, W], y [N]."""
        if self._test is None:
            self._test = self._load_transformed(train=False)
        return self._test

    @property
    def train_set(self) -> TensorDataset:
        return TensorDataset(*self.train_tensors)

    @property
    def val_set(self) -> TensorDataset:
        if self.hparams.val_split == 0:
            return self.test_set
        self._ensure_fit_tensors()
        return TensorDataset(*self._val)

    @property
    def test_set(self) -> TensorDataset:
        return TensorDataset(*self.test_tensors)

    def _normalization_stats(self) -> tuple[Any, Any]:
        if self.hparams.transform in FILTERS:
            return channel_stats(self.train_tensors[0])
        return super()._normalization_stats()


def derived_seed(seed: int, stream: int) -> int:
    """Independent 63-bit seed for `stream` derived from `seed` (numpy SeedSequence; negative seeds allowed)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFFFFFFFFFF, int(stream)]).generate_state(1, np.uint64)[0]
    return int(state) >> 1
