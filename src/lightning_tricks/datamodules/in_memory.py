"""Base DataModule for datasets that fit in memory as one image tensor.

The images stay as one ``(N, C, H, W)`` tensor (uint8 or float in [0, 1]); batches are converted,
augmented and normalised on the training device in :meth:`on_after_batch_transfer`, the way the
fastest CIFAR trainers do, so two CPU cores never starve an accelerator. Per-channel statistics
come from the training split only and live in :meth:`state_dict`, so they travel in the
checkpoint and are applied identically to validation, test and predict batches.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.datamodules.stats import channel_mean_std, to_unit_float


class InMemoryImageDataModule(L.LightningDataModule):
    """Shared split/statistics/normalisation logic; subclasses implement :meth:`load_splits`.

    Args:
        batch_size: Per-device batch size.
        num_workers: DataLoader workers (0 is fastest for in-memory tensors).
        pin_memory: Pin host memory for faster host-to-device copies.
        normalize: Subtract the training mean and divide by the training std per channel.
        seed: Seed for splits and sampling order.
    """

    num_classes: int
    in_channels: int
    image_size: int

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        normalize: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.normalize = normalize
        self.seed = seed
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None
        self._splits: dict[str, TensorDataset] = {}

    @abstractmethod
    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return ``{"train": (images, labels), "val": ..., "test": ...}``; val/test may be absent."""

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            self._splits = {name: TensorDataset(x, y) for name, (x, y) in self.load_splits().items()}
        if self.mean is None:
            self.mean, self.std = channel_mean_std(self._splits["train"].tensors[0])

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        if split not in self._splits:
            raise RuntimeError(f"{type(self).__name__} has no {split!r} split; call setup() first")
        generator = torch.Generator().manual_seed(self.seed) if train else None
        return DataLoader(
            self._splits[split],
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=False,
            generator=generator,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8/float images -> float in [0, 1] -> standardised with the training statistics."""
        images = to_unit_float(images)
        if not self.normalize:
            return images
        if self.mean is None or self.std is None:
            raise RuntimeError(
                "normalisation statistics are missing: call setup() or load a checkpoint first"
            )
        mean = self.mean.to(images.device).view(1, -1, 1, 1)
        std = self.std.to(images.device).view(1, -1, 1, 1).clamp_min(1e-6)
        return (images - mean) / std

    def augment_batch(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-only batch augmentation on the device; identity here, extended by subclasses."""
        return images, targets

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, targets = batch
        training = self.trainer is not None and self.trainer.training
        if training:
            images, targets = self.augment_batch(images, targets)
        return self.normalize_images(images), targets

    def state_dict(self) -> dict[str, Any]:
        if self.mean is None or self.std is None:
            return {}
        return {"mean": self.mean.clone(), "std": self.std.clone()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "mean" in state_dict:
            self.mean = torch.as_tensor(state_dict["mean"], dtype=torch.float32)
            self.std = torch.as_tensor(state_dict["std"], dtype=torch.float32)
