"""ImageNet-style folders: ``train/`` and ``val/`` (and optionally ``test/``) of class sub-folders.

Everything that can be wrong with the folders is found in ``setup``, before the first batch: a
missing or empty folder, class sets that differ between splits (named), and unreadable or
corrupt images (a cheap PIL ``verify`` pass over every file, reported with their paths, skipped
with a warning or raised). Workers then decode with PIL and run the ``transforms.v2`` presets on
uint8 tensors; normalisation with the training statistics (a seeded sample of ``stats_samples``
training images at the evaluation size, streamed, never all in memory) runs on the device.

Evaluation transform: resize the short side to ``resize_size`` (256) and centre-crop
``crop_size`` (224). For ten-crop or multi-scale test-time augmentation set
``test_center_crop=False``: test images are then resized and centre-cropped to a
``resize_size`` square, so the TTA crops of ``crop_size`` fit inside them.

Example::

    from lightning_tricks.datamodules.folder import ImageFolderDataModule

    dm = ImageFolderDataModule("imagenet", augment=["resnet_scale", "color_jitter", "pca_lighting"],
                               num_workers=8, test_center_crop=False)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import v2

from lightning_tricks.datamodules import stats as stats_lib
from lightning_tricks.datamodules.augment import SIZING_PRESETS, PresetContext
from lightning_tricks.datamodules.base import PreprocessedImageDataModule

ON_CORRUPT = ("skip", "raise")
_SHOWN = 10


class ImageFileDataset(Dataset):
    """``(transform(decoded RGB image), label)`` for a list of ``(path, label)`` samples."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
        except OSError as err:  # PIL's verify pass cannot see every truncated file
            raise OSError(f"cannot decode image {path}: {err}") from err
        return self.transform(image), label


def find_corrupt(paths: Sequence[str]) -> list[str]:
    """Paths PIL cannot open or whose structure fails ``Image.verify()`` (no full decode)."""
    corrupt = []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.verify()
        except Exception:  # PIL raises many exception types for bad files
            corrupt.append(path)
    return corrupt


class ImageFolderDataModule(PreprocessedImageDataModule):
    """Train/val(/test) class-folder DataModule with checked data and training-split statistics.

    Args:
        data_dir: Folder holding ``train/`` and ``val/`` (and optionally ``test/``; otherwise
            ``val`` doubles as test), each with one sub-folder per class.
        batch_size: Per-device batch size.
        num_workers: DataLoader workers that decode and augment.
        pin_memory: Pin host memory.
        persistent_workers: Keep workers alive between epochs (default: ``num_workers > 0``).
        seed: Seed of the statistics sample, the shuffling and the augmentation draws.
        augment: Preset name(s); without ``resnet_scale``/``inception`` training images are first
            resized and centre-cropped like evaluation images.
        augment_kwargs: Per-preset keyword overrides.
        batch_augment: ``"mixup"``, ``"cutmix"`` or both.
        mixup_alpha: Beta parameter of mixup.
        cutmix_alpha: Beta parameter of cutmix.
        mixup_off_epoch: Stop mixup/cutmix from this epoch on (``None``: every epoch).
        aug_repeats: Repeated augmentation: each image this many times per epoch (1: off).
        augmix_jsd: Yield a clean and two AugMix views per training image (for the recipe's
            ``regularization.jsd_lambda``); ``augmix`` must be the last preset.
        crop_size: Training/evaluation crop side.
        resize_size: Short side of evaluation images before the centre crop.
        test_center_crop: ``False`` feeds ``resize_size`` squares to test/predict (for TTA).
        on_corrupt: ``"skip"`` (warn with count and paths) or ``"raise"`` for unreadable images.
        verify: Run the PIL verify pass over every file in ``setup``.
        stats_samples: Training images (seeded sample) for the mean/std and colour PCA.
        stats_cache: Folder for the statistics cache, ``"data_dir"`` (default) or ``None``.
        bootstrap_seed: Bagging: train on a seeded bootstrap resample of the training images.
        normalize: Standardise with the training statistics.

    Raises:
        FileNotFoundError: Missing ``data_dir``/``train``/``val`` or class folders, no images.
        ValueError: Class sets differ between splits; corrupt images with ``on_corrupt="raise"``.
    """

    in_channels = 3

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int = 64,
        num_workers: int = 4,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        seed: int = 0,
        augment: str | Sequence[str] | None = ("inception", "flip"),
        augment_kwargs: dict[str, dict[str, Any]] | None = None,
        batch_augment: str | Sequence[str] | None = None,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 1.0,
        mixup_off_epoch: int | None = None,
        aug_repeats: int = 1,
        augmix_jsd: bool = False,
        crop_size: int = 224,
        resize_size: int = 256,
        test_center_crop: bool = True,
        on_corrupt: str = "skip",
        verify: bool = True,
        stats_samples: int = 1000,
        stats_cache: str | Path | None = "data_dir",
        normalize: bool = True,
        bootstrap_seed: int | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            normalize=normalize,
            seed=seed,
            augment=augment,
            augment_kwargs=augment_kwargs,
            batch_augment=batch_augment,
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            mixup_off_epoch=mixup_off_epoch,
            aug_repeats=aug_repeats,
            augmix_jsd=augmix_jsd,
            stats_cache=self.data_dir if stats_cache == "data_dir" else stats_cache,
            bootstrap_seed=bootstrap_seed,
        )
        if crop_size < 1:
            raise ValueError(f"crop_size must be >= 1, got {crop_size}")
        if resize_size < crop_size:
            raise ValueError(f"resize_size must be >= crop_size={crop_size}, got {resize_size}")
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if stats_samples < 1:
            raise ValueError(f"stats_samples must be >= 1, got {stats_samples}")
        self.crop_size = crop_size
        self.resize_size = resize_size
        self.test_center_crop = test_center_crop
        self.on_corrupt = on_corrupt
        self.verify = verify
        self.stats_samples = stats_samples
        self.samples: dict[str, list[tuple[str, int]]] = {}
        self.skipped: list[str] = []

    # Layout checks --------------------------------------------------------------------------
    def _split_dir(self, split: str) -> Path:
        path = self.data_dir / split
        if not self.data_dir.is_dir():
            raise FileNotFoundError(
                f"data_dir {self.data_dir.resolve()} does not exist; point it at a folder with "
                f"train/ and val/ sub-folders of class folders"
            )
        if not path.is_dir():
            same = "" if split == "train" else ", the same class folders as train/"
            raise FileNotFoundError(
                f"missing {split}/ folder in data_dir {self.data_dir.resolve()}: expected {path.resolve()} "
                f"with one sub-folder per class{same}; e.g. {self._missing_split_fix(split)}"
            )
        return path

    def _missing_split_fix(self, split: str) -> str:
        """How to give ``data_dir`` the missing ``split``: rename the folder that holds it, or make it."""
        others = sorted(
            f"{entry.name}/"
            for entry in os.scandir(self.data_dir)
            if entry.is_dir() and entry.name not in ("train", "val", "test")
        )
        if split == "train":
            return "point data_dir at the folder that holds train/ and val/" + (
                f", or rename the training folder to train/ (sub-folders here: {', '.join(others)})"
                if others
                else ""
            )
        rename = (
            f"rename the validation folder to val/ (sub-folders here: {', '.join(others)}), or "
            if others
            else ""
        )
        return (
            f"{rename}move about a tenth of the images of each train/<class>/ into val/<class>/ "
            "(this DataModule has no val_fraction: it validates on the val/ folder)"
        )

    @cached_property
    def classes(self) -> list[str]:
        """Sorted class names (sub-folders of ``train/``), checked against ``val/`` and ``test/``."""
        classes, _ = find_classes(str(self._split_dir("train")))
        if len(classes) < 2:
            raise ValueError(
                f"data_dir {self.data_dir} has one class folder in train/ ({classes[0]}): a classifier "
                "needs at least 2 classes; add one sub-folder of images per class under train/ and val/"
            )
        for split in ("val", "test"):
            if split == "test" and not (self.data_dir / "test").is_dir():
                continue
            other = {entry.name for entry in os.scandir(self._split_dir(split)) if entry.is_dir()}
            only_train, only_other = sorted(set(classes) - other), sorted(other - set(classes))
            if only_train or only_other:
                raise ValueError(
                    f"class folders differ between train/ and {split}/: only in train: {only_train}, "
                    f"only in {split}: {only_other}"
                )
        return classes

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.classes)

    def _scan(self, split: str) -> list[tuple[str, int]]:
        class_to_idx = {name: i for i, name in enumerate(self.classes)}
        samples = make_dataset(str(self._split_dir(split)), class_to_idx, IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            raise FileNotFoundError(
                f"no images ({', '.join(IMG_EXTENSIONS)}) in the class folders of {self.data_dir / split}"
            )
        self._check_no_empty_class(split, samples)
        return samples

    def _check_no_empty_class(self, split: str, samples: list[tuple[str, int]]) -> None:
        """A training class folder without images would give the model a class it never sees."""
        present = {label for _, label in samples}
        empty = [self.data_dir / split / name for i, name in enumerate(self.classes) if i not in present]
        if not empty:
            return
        message = (
            f"class folder(s) without images ({', '.join(IMG_EXTENSIONS)}) in {split}/: "
            f"{', '.join(str(path.resolve()) for path in empty)}"
        )
        if split == "train":
            raise FileNotFoundError(
                f"{message}; the model would get classes with no training data. Put images in them, "
                f"or remove the folder(s) from every split of data_dir={self.data_dir}"
            )
        rank_zero_warn(f"{message}; those classes are not evaluated on {split}/")

    def _drop_corrupt(self, split: str, samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
        corrupt = find_corrupt([path for path, _ in samples])
        if not corrupt:
            return samples
        shown = ", ".join(corrupt[:_SHOWN]) + (
            f" and {len(corrupt) - _SHOWN} more" if len(corrupt) > _SHOWN else ""
        )
        if self.on_corrupt == "raise":
            raise ValueError(f"{len(corrupt)} unreadable image(s) in {split}/: {shown}")
        rank_zero_warn(f"Skipping {len(corrupt)} unreadable image(s) in {split}/: {shown}")
        self.skipped += corrupt
        bad = set(corrupt)
        kept = [sample for sample in samples if sample[0] not in bad]
        if not kept:
            raise FileNotFoundError(f"every image in {self.data_dir / split} is unreadable")
        return kept

    def setup(self, stage: str | None = None) -> None:
        if not self.samples:
            splits = ["train", "val"] + (["test"] if (self.data_dir / "test").is_dir() else [])
            for split in splits:
                samples = self._scan(split)
                self.samples[split] = self._drop_corrupt(split, samples) if self.verify else samples
            self.samples.setdefault("test", self.samples["val"])
        self.prepare_statistics()
        self.build_batch_augment()
        self.train_transform()  # options that depend on the crop size fail here, not in a worker

    # Transforms -----------------------------------------------------------------------------
    def eval_transform(self, center_crop: bool = True) -> Callable:
        """Decode -> resize short side to ``resize_size`` -> centre crop (``crop_size`` or square)."""
        crop = self.crop_size if center_crop else self.resize_size
        return v2.Compose(
            [
                v2.ToImage(),
                v2.Resize(self.resize_size, antialias=True),
                v2.CenterCrop(crop),
                v2.ToPureTensor(),
            ]
        )

    def train_transform(self) -> Callable:
        """Decode -> presets (after an evaluation-style resize/crop when no preset sizes the image)."""
        context = PresetContext(size=self.crop_size, stats=self.stats)
        sizing = (
            []
            if any(name in SIZING_PRESETS for name in self.augment)
            else [v2.Resize(self.resize_size, antialias=True), v2.CenterCrop(self.crop_size)]
        )
        presets = self.preset_transform(context)
        return v2.Compose([v2.ToImage(), *sizing, presets, v2.ToPureTensor()])

    # Statistics -----------------------------------------------------------------------------
    def _stats_subset(self) -> list[tuple[str, int]]:
        train = self.samples["train"]
        generator = torch.Generator().manual_seed(self.seed)
        idx = torch.randperm(len(train), generator=generator)[: self.stats_samples].sort().values
        return [train[i] for i in idx.tolist()]

    def stats_fingerprint(self) -> str:
        files = [
            (os.path.relpath(path, self.data_dir), os.path.getsize(path)) for path, _ in self.samples["train"]
        ]
        return stats_lib.fingerprint(
            files=files, samples=self.stats_samples, seed=self.seed, size=(self.resize_size, self.crop_size)
        )

    def fit_statistics(self) -> None:
        loader = DataLoader(
            ImageFileDataset(self._stats_subset(), self.eval_transform()),
            batch_size=64,
            num_workers=self.num_workers,
        )
        self.stats.fit_stream(images for images, _ in loader)

    # Loaders --------------------------------------------------------------------------------
    def _require(self, split: str) -> list[tuple[str, int]]:
        if split not in self.samples:
            raise RuntimeError(f"{type(self).__name__} has no {split!r} split; call setup() first")
        return self.samples[split]

    def train_dataloader(self) -> DataLoader:
        return self._dataloader(ImageFileDataset(self._require("train"), self.train_transform()), train=True)

    def val_dataloader(self) -> DataLoader:
        return self._dataloader(ImageFileDataset(self._require("val"), self.eval_transform()), train=False)

    def test_dataloader(self) -> DataLoader:
        transform = self.eval_transform(center_crop=self.test_center_crop)
        return self._dataloader(ImageFileDataset(self._require("test"), transform), train=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
