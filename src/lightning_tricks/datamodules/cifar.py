"""CIFAR-10 and CIFAR-100 as in-memory uint8 tensors, with the classic augmentation by default.

The default recipe is the CIFAR standard (pad 4, random 32x32 crop, horizontal flip) run on the
training device, per-channel normalisation with the training split's statistics (saved in the
checkpoint and cached next to the data), and a seeded validation split carved from the 50,000
training images.

Example::

    from lightning_tricks.datamodules.cifar import CIFAR10DataModule

    dm = CIFAR10DataModule(data_dir="data", val_size=5000, augment=["crop_flip"], batch_size=512)

or in LightningCLI YAML::

    data:
      class_path: lightning_tricks.datamodules.cifar.CIFAR10DataModule
      init_args: {data_dir: data, augment: [crop_flip, random_erasing], augment_on_device: false}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torchvision.datasets import CIFAR10, CIFAR100

from lightning_tricks.datamodules import stats as stats_lib
from lightning_tricks.datamodules.base import InMemoryImageDataModule


class CIFAR10DataModule(InMemoryImageDataModule):
    """CIFAR-10 from torchvision's on-disk format (``data_dir/cifar-10-batches-py``).

    Args:
        data_dir: Folder containing (or to receive) ``cifar-10-batches-py``.
        download: Download into ``data_dir`` in ``prepare_data`` when missing.
        val_size: Validation images carved from the training set: an int count, a fraction in
            [0, 1), or 0/None for no validation split. The test split is CIFAR's test set.
        batch_size: Per-device batch size.
        num_workers: DataLoader workers (0 is fastest with ``augment_on_device=True``).
        pin_memory: Pin host memory.
        persistent_workers: Keep workers alive between epochs (default: ``num_workers > 0``).
        seed: Seed of the validation split, statistics subsets and shuffling.
        augment: Preset name(s) (default the CIFAR standard ``"crop_flip"``).
        augment_on_device: Augment whole batches on the training device (``flip``, ``translate``,
            ``crop_flip``, ``salt_pepper``, ``lens_distortion``); ``False`` runs any preset per
            sample on CPU workers.
        stats_cache: Folder for the statistics cache, ``"data_dir"`` (default) for ``data_dir``,
            or ``None`` to always recompute.
        **kwargs: ``augment_kwargs``, ``pad_mode``, ``flip_mode``, ``batch_augment``, ``mixup_alpha``,
            ``cutmix_alpha``, ``mixup_off_epoch``, ``aug_repeats``, ``augmix_jsd``, ``normalize``,
            ``mean_image``, ``std_image``, ``whitening``, ``whitening_eps``
            (see :class:`~lightning_tricks.datamodules.base.InMemoryImageDataModule`).

    Raises:
        FileNotFoundError: At ``setup`` when the data is missing and ``download=False``.
    """

    dataset_cls: type[CIFAR10] = CIFAR10
    num_classes = 10
    in_channels = 3
    image_size = 32
    autoaugment_policy = "cifar10"

    def __init__(
        self,
        data_dir: str | Path = "data",
        download: bool = True,
        val_size: int | float | None = 5000,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        seed: int = 0,
        augment: str | Sequence[str] | None = "crop_flip",
        augment_on_device: bool = True,
        stats_cache: str | Path | None = "data_dir",
        **kwargs: Any,
    ) -> None:
        if val_size is None:
            val_size = 0
        if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
            raise ValueError(f"val_size must be an int count, a fraction in [0, 1) or None, got {val_size!r}")
        if isinstance(val_size, float) and not 0.0 <= val_size < 1.0:
            raise ValueError(f"a fractional val_size must be in [0, 1), got {val_size}")
        if isinstance(val_size, int) and val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        self.data_dir = Path(data_dir)
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
            seed=seed,
            augment=augment,
            augment_on_device=augment_on_device,
            stats_cache=self.data_dir if stats_cache == "data_dir" else stats_cache,
            **kwargs,
        )
        self.download = download
        self.val_size = val_size

    @property
    def dataset_folder(self) -> Path:
        return self.data_dir / self.dataset_cls.base_folder

    def prepare_data(self) -> None:
        if self.download:
            for train in (True, False):
                try:
                    self.dataset_cls(str(self.data_dir), train=train, download=True)
                except OSError as err:  # URLError, HTTPError, socket errors: no network
                    raise self._download_error(err) from err

    def _download_error(self, err: OSError) -> FileNotFoundError:
        """What was looked at, what is wrong with it and what to put there, when a download fails."""
        folder = self.dataset_folder.resolve()
        state = (
            "exists but its files are missing or fail torchvision's checksum (corrupt or incomplete)"
            if folder.is_dir()
            else "does not exist"
        )
        name, archive = self.dataset_cls.__name__, self.dataset_cls.filename
        return FileNotFoundError(
            f"{name}: {folder} {state}, and downloading it failed ({err}). Put the extracted "
            f"{self.dataset_cls.base_folder}/ folder (from {archive}, {self.dataset_cls.url}) in "
            f"data_dir={self.data_dir.resolve()}, or rerun with network access; "
            "download=false never tries to download"
        )

    def _dataset(self, train: bool) -> CIFAR10:
        if not self.dataset_folder.is_dir():
            if self.download:
                self.prepare_data()
            else:
                raise FileNotFoundError(
                    f"{self.dataset_cls.__name__} not found: looked for {self.dataset_folder.resolve()}. "
                    f"Set download=True or point data_dir at the folder containing "
                    f"{self.dataset_cls.base_folder}"
                )
        try:
            return self.dataset_cls(str(self.data_dir), train=train, download=False)
        except RuntimeError as err:
            raise RuntimeError(
                f"{self.dataset_cls.__name__} files in {self.dataset_folder.resolve()} are missing or "
                f"corrupt (checksum mismatch). Delete the folder and set download=True to fetch them again."
            ) from err

    def _val_count(self, n_train: int) -> int:
        count = round(self.val_size * n_train) if isinstance(self.val_size, float) else self.val_size
        if count >= n_train:
            raise ValueError(f"val_size={self.val_size} leaves no training images out of {n_train}")
        return count

    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        splits = {}
        for name, train in (("train", True), ("test", False)):
            dataset = self._dataset(train)
            images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
            splits[name] = (images, torch.as_tensor(dataset.targets, dtype=torch.long))
        images, labels = splits["train"]
        n_val = self._val_count(len(labels))
        if n_val > 0:
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            val_idx, train_idx = perm[:n_val].sort().values, perm[n_val:].sort().values
            splits["val"] = (images[val_idx], labels[val_idx])
            splits["train"] = (images[train_idx], labels[train_idx])
        return splits

    def stats_fingerprint(self) -> str:
        files = sorted(
            (path.name, path.stat().st_size) for path in self.dataset_folder.iterdir() if path.is_file()
        )
        return stats_lib.fingerprint(files=files, val_size=self.val_size, seed=self.seed)


class CIFAR100DataModule(CIFAR10DataModule):
    """CIFAR-100 (fine labels) from ``data_dir/cifar-100-python``; arguments as :class:`CIFAR10DataModule`.

    Example::

        dm = CIFAR100DataModule(data_dir="data", augment=["crop_flip"], batch_augment=["mixup", "cutmix"])
    """

    dataset_cls = CIFAR100
    num_classes = 100
