"""Synthetic images of any shape and class count, for tests and throughput measurements.

Example::

    from lightning_tricks.datamodules import SyntheticDataModule

    dm = SyntheticDataModule(num_classes=100, image_size=32, num_train=50_000)  # CIFAR-shaped uint8
"""

from __future__ import annotations

import torch

from lightning_tricks.datamodules.base import InMemoryImageDataModule


class SyntheticDataModule(InMemoryImageDataModule):
    """Seeded uint8 images: each class has its own mean image plus noise, so it is learnable.

    Args:
        num_classes: Number of classes.
        image_size: Square image side.
        in_channels: Image channels.
        num_train: Training images.
        num_val: Validation images.
        num_test: Test images.
        noise: Noise std relative to the class-pattern contrast (larger is harder).
        batch_size: Per-device batch size.
        seed: Seed for the images, labels and shuffling.
        num_workers: DataLoader workers.
        normalize: Standardise with the training split's mean/std.
        bootstrap_seed: Bagging: train on a seeded bootstrap resample of the training split.
        augment: On-device training augmentation: ``"flip"``, ``"translate"`` or ``"crop_flip"``
            (padding ``max(1, image_size // 8)``); ``None`` (default) for none.
        augment_on_device: Augment whole batches on the training device (default); ``False`` runs
            ``augment`` per sample on the CPU with ``transforms.v2`` (the slow reference path).
        flip_mode: ``"random"`` or ``"alternating"`` (airbench), see :class:`InMemoryImageDataModule`.
        data_on_device: Keep the splits resident on the training device (no host-to-device copies).
    """

    def __init__(
        self,
        num_classes: int = 10,
        image_size: int = 32,
        in_channels: int = 3,
        num_train: int = 1024,
        num_val: int = 256,
        num_test: int = 256,
        noise: float = 0.5,
        batch_size: int = 128,
        seed: int = 0,
        num_workers: int = 0,
        normalize: bool = True,
        augment: str | list[str] | None = None,
        bootstrap_seed: int | None = None,
        augment_on_device: bool = True,
        flip_mode: str = "random",
        data_on_device: bool = False,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            normalize=normalize,
            seed=seed,
            augment=augment,
            bootstrap_seed=bootstrap_seed,
            augment_on_device=augment_on_device,
            flip_mode=flip_mode,
            data_on_device=data_on_device,
        )
        for name, value in (
            ("num_classes", num_classes),
            ("image_size", image_size),
            ("in_channels", in_channels),
            ("num_train", num_train),
        ):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_val < 0 or num_test < 0:
            raise ValueError(f"num_val and num_test must be >= 0, got {num_val}, {num_test}")
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        self.num_classes = num_classes
        self.image_size = image_size
        self.in_channels = in_channels
        self.sizes = {"train": num_train, "val": num_val, "test": num_test}
        self.noise = noise

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed)
        shape = (self.in_channels, self.image_size, self.image_size)
        patterns = torch.rand((self.num_classes, *shape), generator=generator)
        splits = {}
        for name, size in self.sizes.items():
            if size == 0:
                continue
            labels = torch.randint(self.num_classes, (size,), generator=generator)
            noise = torch.randn((size, *shape), generator=generator) * self.noise * 0.25
            images = (0.5 + 0.5 * (patterns[labels] - 0.5) + noise).clamp(0, 1)
            splits[name] = (images.mul(255).round().to(torch.uint8), labels)
        return splits
