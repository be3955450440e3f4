"""Batched loading of in-memory tensors: one gather per batch instead of one ``__getitem__`` per sample.

For data that fits in memory (digits, CIFAR, synthetic) a ``DataLoader`` spends most of its time
indexing one sample at a time and collating; :class:`TensorBatchLoader` instead draws the epoch's
order from a :class:`~lightning_tricks.datamodules.order.ResumableSampler` and slices every tensor
with one ``index_select`` per batch. The tensors may live on the accelerator (``data_on_device``),
then an epoch moves no image bytes from host to device. Hand-written because torch's ``DataLoader``
has no path that skips per-sample fetching and collation for tensors.

Example::

    sampler = ResumableSampler(len(labels), batch_size=512, seed=0)
    loader = TensorBatchLoader((images, labels), batch_size=512, sampler=sampler)
    for epoch in range(3):
        sampler.set_epoch(epoch)  # Lightning does this itself
        for x, y in loader:
            ...
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_tricks.datamodules.flip import AlternatingFlip
from lightning_tricks.datamodules.order import ResumableSampler

__all__ = ["TensorBatchLoader", "TransformedTensorDataset"]


class TensorBatchLoader:
    """Batches ``tuple(t[idx] for t in tensors)`` with ``idx`` taken from ``sampler`` in slices.

    Args:
        tensors: Equal-length tensors (images, labels), on any one device.
        batch_size: Items per batch.
        sampler: Order of positions ``0..len(index)-1`` (Lightning calls its ``set_epoch``).
        index: Optional map from positions to rows of ``tensors`` (e.g. a bootstrap resample).
        drop_last: Drop the final incomplete batch.
        pin_memory: Pin each CPU batch for asynchronous host-to-device copies.
        flip: Optional per-index flip of the images (``tensors[0]``) in the sampler's epoch, applied
            right after the gather, where each row's dataset index is known (``flip_mode: alternating``).

    Example::

        loader = TensorBatchLoader((images, labels), 64, ResumableSampler(len(labels), 64, shuffle=False))
        x, y = next(iter(loader))  # images[:64], labels[:64]
    """

    # Read like a DataLoader's by Lightning: it calls ``sampler.set_epoch`` at every epoch start.
    batch_sampler = None

    def __init__(
        self,
        tensors: Sequence[torch.Tensor],
        batch_size: int,
        sampler: ResumableSampler,
        index: torch.Tensor | None = None,
        drop_last: bool = False,
        pin_memory: bool = False,
        flip: AlternatingFlip | None = None,
    ) -> None:
        sizes = {len(t) for t in tensors}
        if len(sizes) != 1:
            raise ValueError(f"tensors must have equal lengths, got {sorted(sizes)}")
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(f"tensors must be on one device, got {sorted(map(str, devices))}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors = tuple(tensors)
        self.batch_size = batch_size
        self.sampler = sampler
        self.device = devices.pop()
        self.index = None if index is None else index.to(self.device)
        self.drop_last = drop_last
        self.pin_memory = pin_memory and self.device.type == "cpu" and torch.cuda.is_available()
        self.flip = flip

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        order = torch.as_tensor(list(self.sampler), dtype=torch.long, device=self.device)
        if self.index is not None:
            order = self.index[order]
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            if self.drop_last and len(rows) < self.batch_size:
                return
            batch = tuple(t.index_select(0, rows) for t in self.tensors)
            if self.flip is not None:
                batch = (self.flip(batch[0], rows, self.sampler.epoch), *batch[1:])
            yield tuple(b.pin_memory() for b in batch) if self.pin_memory else batch

    def state_dict(self) -> dict[str, Any]:
        """Empty: the owning DataModule saves the order (epoch, batches consumed) in its own state.

        Present so Lightning treats the loader as resumable instead of warning that it is not.
        """
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to load; see :meth:`state_dict`."""


class TransformedTensorDataset(Dataset):
    """``(transform(images[i]), labels[i])``: the per-sample CPU path for ``transforms.v2`` presets.

    Example::

        dataset = TransformedTensorDataset(images_uint8, labels, v2.RandomHorizontalFlip())
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[index]), self.labels[index]
