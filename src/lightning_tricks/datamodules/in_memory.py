"""Base DataModules: training-split statistics, device-side normalisation, augmentation presets.

:class:`PreprocessedImageDataModule` holds what every image DataModule here shares: statistics
fitted on the training split only (per-channel mean/std, optionally the mean image and ZCA/PCA
whitening, and the colour PCA for lighting augmentation) that live in :meth:`state_dict` and so
travel in the checkpoint, a fingerprinted cache file, and :meth:`on_after_batch_transfer`, which
augments, normalises and mixes batches on the training device.

:class:`InMemoryImageDataModule` keeps the images as one ``(N, C, H, W)`` tensor (uint8 or float
in [0, 1]); its training batches are augmented either on the device, vectorised per batch (the
way the fastest CIFAR trainers do, so two CPU cores never starve an accelerator), or per sample
on the CPU with torchvision ``transforms.v2`` presets.

Lightning calls ``setup`` before it restores a checkpoint's DataModule state, so statistics
loaded from a checkpoint replace the freshly computed (or cached) ones before any batch is seen.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_tricks.datamodules import stats as stats_lib
from lightning_tricks.datamodules.augment import BatchAugment, PresetContext, build_transform, preset_names
from lightning_tricks.datamodules.on_device import OnDeviceAugment
from lightning_tricks.datamodules.resampling import bootstrap_indices
from lightning_tricks.datamodules.stats import ImageStatistics


class PreprocessedImageDataModule(L.LightningDataModule):
    """Training statistics, their cache, and the device-side batch hook.

    Args:
        batch_size: Per-device batch size.
        num_workers: DataLoader workers.
        pin_memory: Pin host memory for faster host-to-device copies.
        persistent_workers: Keep workers alive between epochs (default: when ``num_workers > 0``).
        normalize: Subtract the training mean and divide by the training std per channel.
        seed: Seed for splits, statistics subsets and sampling order.
        augment: Per-sample augmentation preset name(s), see :mod:`~lightning_tricks.datamodules.augment`.
        augment_kwargs: Per-preset keyword overrides, e.g. ``{"random_erasing": {"p": 0.25}}``.
        batch_augment: ``"mixup"``, ``"cutmix"`` or both (soft ``(N, C)`` float targets).
        mixup_alpha: Beta parameter of mixup.
        cutmix_alpha: Beta parameter of cutmix.
        mean_image: Subtract the training mean image instead of the channel mean.
        whitening: ``None``, ``"zca"`` or ``"pca"`` whitening fitted on the training split.
        whitening_eps: Added to the whitening eigenvalues.
        stats_cache: Folder for the statistics cache file (named by a fingerprint of the training
            split and the options), or ``None`` to always recompute.
        bootstrap_seed: Bagging: train on a bootstrap resample of the training split (``n`` draws
            with replacement, seeded), so each ensemble member sees a different sample. ``None``
            trains on the split itself. Statistics always come from the whole training split.
    """

    num_classes: int
    in_channels: int

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        normalize: bool = True,
        seed: int = 0,
        augment: str | Sequence[str] | None = None,
        augment_kwargs: dict[str, dict[str, Any]] | None = None,
        batch_augment: str | Sequence[str] | None = None,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 1.0,
        mean_image: bool = False,
        whitening: str | None = None,
        whitening_eps: float = 1e-2,
        stats_cache: str | Path | None = None,
        bootstrap_seed: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0, got num_workers=0")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.normalize = normalize
        self.seed = seed
        self.augment = preset_names(augment)
        self.augment_kwargs = dict(augment_kwargs or {})
        stray = [name for name in self.augment_kwargs if name not in self.augment]
        if stray:
            raise ValueError(f"augment_kwargs has entries {stray} for presets not in augment={self.augment}")
        self.batch_augment = [batch_augment] if isinstance(batch_augment, str) else list(batch_augment or [])
        # Validate names and alphas now; the module itself needs num_classes, known after setup.
        if self.batch_augment:
            BatchAugment(
                self.batch_augment, num_classes=2, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha
            )
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.stats = ImageStatistics(
            normalize=normalize, mean_image=mean_image, whitening=whitening, eps=whitening_eps
        )
        self.stats_cache = None if stats_cache is None else Path(stats_cache)
        self.bootstrap_seed = bootstrap_seed
        self._batch_augment: BatchAugment | None = None

    # Statistics ---------------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor | None:
        """Per-channel training mean ``(C,)`` in [0, 1] units (``None`` before setup)."""
        return self.stats.mean

    @property
    def std(self) -> torch.Tensor | None:
        """Per-channel training std ``(C,)`` in [0, 1] units (``None`` before setup)."""
        return self.stats.std

    @abstractmethod
    def stats_fingerprint(self) -> str:
        """Identity of the training split (files, sizes, seed) for the statistics cache."""

    @abstractmethod
    def fit_statistics(self) -> None:
        """Fit ``self.stats`` on the training split."""

    def stats_cache_file(self) -> Path | None:
        """The cache file for the current split and options, or ``None`` when caching is off."""
        if self.stats_cache is None:
            return None
        key = stats_lib.fingerprint(
            split=self.stats_fingerprint(), options=self.stats.options(), cls=type(self).__name__
        )
        return self.stats_cache / f"lightning_tricks_stats_{key[:20]}.pt"

    def prepare_statistics(self) -> None:
        """Load the statistics from the cache file or fit and cache them (no-op once present)."""
        if self.stats.fitted:
            return
        cache = self.stats_cache_file()
        if cache is not None and cache.is_file():
            self.stats.load(cache)
            rank_zero_info(f"Loaded training-split statistics from {cache}")
            return
        self.fit_statistics()
        if cache is not None:
            _save_on_rank_zero(self.stats, cache)

    def build_batch_augment(self) -> None:
        if self.batch_augment and self._batch_augment is None:
            self._batch_augment = BatchAugment(
                self.batch_augment,
                self.num_classes,
                mixup_alpha=self.mixup_alpha,
                cutmix_alpha=self.cutmix_alpha,
            )

    # Device-side batch processing ---------------------------------------------------------
    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8/float images -> float in [0, 1] -> preprocessed with the training statistics."""
        return self.stats.apply(images)

    def augment_batch(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-only batch augmentation on the device before normalisation (identity here)."""
        return images, targets

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, targets = batch
        training = self.trainer is not None and self.trainer.training
        if training:
            images, targets = self.augment_batch(images, targets)
        images = self.normalize_images(images)
        if training and self._batch_augment is not None:
            images, targets = self._batch_augment(images, targets)
        return images, targets

    def state_dict(self) -> dict[str, Any]:
        return self.stats.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "mean" in state_dict:
            self.stats.load_state_dict(state_dict)

    def _dataloader(self, dataset: Dataset, train: bool) -> DataLoader:
        if train and self.bootstrap_seed is not None:
            dataset = Subset(dataset, bootstrap_indices(len(dataset), self.bootstrap_seed).tolist())
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=False,
            generator=torch.Generator().manual_seed(self.seed) if train else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )


@rank_zero_only
def _save_on_rank_zero(stats: ImageStatistics, path: Path) -> None:
    stats.save(path)
    rank_zero_info(f"Saved training-split statistics to {path}")


class TransformedTensorDataset(Dataset):
    """``(images[i], labels[i])`` with a per-sample transform applied to the image."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]


class InMemoryImageDataModule(PreprocessedImageDataModule):
    """Shared split/statistics/augmentation logic; subclasses implement :meth:`load_splits`.

    Args:
        augment_on_device: Run ``augment`` vectorised per batch on the training device (presets
            ``flip``, ``translate``, ``crop_flip``) instead of per sample on the CPU (any preset).
        pad_mode: Padding of ``translate``/``crop_flip``: ``"reflect"`` or ``"zeros"``.
        **kwargs: See :class:`PreprocessedImageDataModule`.

    Example::

        class MyData(InMemoryImageDataModule):
            num_classes, in_channels, image_size = 10, 3, 32

            def load_splits(self):
                return {"train": (train_uint8, train_labels), "test": (test_uint8, test_labels)}

        dm = MyData(augment="crop_flip", batch_augment=["mixup", "cutmix"])
    """

    image_size: int

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        normalize: bool = True,
        seed: int = 0,
        augment: str | Sequence[str] | None = None,
        augment_on_device: bool = True,
        pad_mode: str = "reflect",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            normalize=normalize,
            seed=seed,
            augment=augment,
            **kwargs,
        )
        if augment_on_device:
            OnDeviceAugment(self.augment, pad_mode=pad_mode)  # validates names and pad_mode now
        else:
            PresetContext(size=1, pad_mode=pad_mode)
        self.augment_on_device = augment_on_device
        self.pad_mode = pad_mode
        self._splits: dict[str, TensorDataset] = {}
        self._device_augment: OnDeviceAugment | None = None

    @abstractmethod
    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return ``{"train": (images, labels), "val": ..., "test": ...}``; val/test may be absent."""

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            self._splits = {name: TensorDataset(x, y) for name, (x, y) in self.load_splits().items()}
        self.prepare_statistics()
        self.build_batch_augment()
        if self.augment_on_device and self._device_augment is None:
            pad = self._pad()
            flip_p = next((kw["p"] for kw in self.augment_kwargs.values() if "p" in kw), 0.5)
            self._device_augment = OnDeviceAugment(
                self.augment, pad=pad, pad_mode=self.pad_mode, flip_p=flip_p
            )

    def _pad(self) -> int:
        default = max(1, self.image_size // 8)
        return next((kw["pad"] for kw in self.augment_kwargs.values() if "pad" in kw), default)

    def stats_fingerprint(self) -> str:
        return stats_lib.tensor_fingerprint(self._splits["train"].tensors[0])

    def fit_statistics(self) -> None:
        self.stats.fit(self._splits["train"].tensors[0], seed=self.seed)

    def train_transform(self) -> Callable:
        """The per-sample CPU pipeline of the ``augment`` presets (``augment_on_device=False``)."""
        context = PresetContext(
            size=self.image_size,
            pad=self._pad(),
            pad_mode=self.pad_mode,
            stats=self.stats,
            autoaugment_policy=getattr(self, "autoaugment_policy", "imagenet"),
        )
        return build_transform(self.augment, context, self.augment_kwargs)

    def _split(self, split: str) -> TensorDataset:
        if split not in self._splits:
            raise RuntimeError(f"{type(self).__name__} has no {split!r} split; call setup() first")
        return self._splits[split]

    def train_dataloader(self) -> DataLoader:
        dataset: Dataset = self._split("train")
        if self.augment and not self.augment_on_device:
            images, labels = self._splits["train"].tensors
            dataset = TransformedTensorDataset(images, labels, self.train_transform())
        return self._dataloader(dataset, train=True)

    def val_dataloader(self) -> DataLoader | list:
        if "val" not in self._splits and "train" in self._splits:
            return []
        return self._dataloader(self._split("val"), train=False)

    def test_dataloader(self) -> DataLoader:
        return self._dataloader(self._split("test"), train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._dataloader(self._split("test"), train=False)

    def augment_batch(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the on-device presets to a training batch (already on the device)."""
        if self._device_augment is not None:
            images = self._device_augment(images)
        return images, targets
