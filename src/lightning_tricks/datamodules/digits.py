"""scikit-learn's real 8x8 handwritten digits: 1,797 images that ship with scikit-learn, no download.

Example::

    from lightning_tricks.datamodules import DigitsDataModule

    dm = DigitsDataModule(batch_size=64, image_size=32)
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))  # (64, 1, 32, 32) float in [0, 1], int64
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.nn import functional as F

from lightning_tricks.datamodules.base import InMemoryImageDataModule


class DigitsDataModule(InMemoryImageDataModule):
    """Seeded, stratified train/val/test split of the digits, optionally upscaled to 32x32.

    Args:
        batch_size: Per-device batch size.
        val_fraction: Fraction of all images held out for validation.
        test_fraction: Fraction of all images held out for testing.
        image_size: 8 (native) or a larger side the images are bilinearly upscaled to (e.g. 32,
            so CIFAR architectures apply unchanged).
        seed: Seed of the stratified split and the shuffling order.
        num_workers: DataLoader workers.
        normalize: Standardise with the training split's mean/std.
        bootstrap_seed: Bagging: train on a seeded bootstrap resample of the training split.
        augment: On-device training augmentation: ``"flip"``, ``"translate"``, ``"crop_flip"``
            (padding ``max(1, image_size // 8)``), ``"salt_pepper"``, ``"lens_distortion"``; any
            other preset with ``augment_on_device=False``; ``None`` (default) for none.
        augment_on_device: Augment whole batches on the training device (default); ``False`` runs
            ``augment`` per sample on the CPU with ``transforms.v2`` (the slow reference path).
        data_on_device: Keep the splits resident on the training device (no host-to-device copies).
        train_per_class: Few-labels regime: keep only this many training images per class (a seeded
            subset of the training split); validation and test splits are unchanged. ``None`` keeps all.
        **kwargs: Further options of :class:`InMemoryImageDataModule` (``batch_augment``, ...).
    """

    num_classes = 10
    in_channels = 1

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        image_size: int = 8,
        seed: int = 0,
        num_workers: int = 0,
        normalize: bool = True,
        augment: str | list[str] | None = None,
        bootstrap_seed: int | None = None,
        augment_on_device: bool = True,
        data_on_device: bool = False,
        train_per_class: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            normalize=normalize,
            seed=seed,
            augment=augment,
            bootstrap_seed=bootstrap_seed,
            augment_on_device=augment_on_device,
            data_on_device=data_on_device,
            **kwargs,
        )
        if train_per_class is not None and train_per_class < 1:
            raise ValueError(f"train_per_class must be >= 1 or None (all images), got {train_per_class}")
        self.train_per_class = train_per_class
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if val_fraction + test_fraction >= 0.9:
            raise ValueError(
                f"val_fraction + test_fraction must leave at least 10% for training, "
                f"got {val_fraction} + {test_fraction}"
            )
        if image_size < 8:
            raise ValueError(f"image_size must be >= 8 (the native digits size), got {image_size}")
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.image_size = image_size

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        if self.image_size != 8:
            images = F.interpolate(images, size=self.image_size, mode="bilinear", align_corners=False)
        labels = torch.tensor(digits.target, dtype=torch.long)
        indices = np.arange(len(labels))
        splits: dict[str, np.ndarray] = {}
        rest = indices
        if self.test_fraction > 0:
            rest, splits["test"] = train_test_split(
                rest, test_size=self.test_fraction, stratify=labels[rest], random_state=self.seed
            )
        if self.val_fraction > 0:
            rest, splits["val"] = train_test_split(
                rest,
                test_size=self.val_fraction / (1.0 - self.test_fraction),
                stratify=labels[rest],
                random_state=self.seed,
            )
        if self.train_per_class is not None:
            rest = _per_class_subset(rest, labels[rest].numpy(), self.train_per_class, self.seed)
        splits["train"] = rest
        return {
            name: (images[torch.as_tensor(idx)], labels[torch.as_tensor(idx)]) for name, idx in splits.items()
        }


def _per_class_subset(indices: np.ndarray, labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """A seeded choice of ``per_class`` indices of every class (fails when a class has fewer)."""
    rng = np.random.default_rng(seed)
    chosen = []
    for label in np.unique(labels):
        members = indices[labels == label]
        if len(members) < per_class:
            raise ValueError(
                f"train_per_class={per_class} but class {label} has only {len(members)} training images;"
                f" use at most {len(members)}"
            )
        chosen.append(rng.choice(members, size=per_class, replace=False))
    return np.sort(np.concatenate(chosen))
