"""Resumable data order and random-number streams, saved in the DataModule's checkpoint state.

Lightning checkpoints carry neither the sampler's position nor the global random-number streams
(Lightning-AI/pytorch-lightning#17543), so a resumed run would replay an epoch's first batches and
draw other augmentations and dropout masks. Two pieces close that gap:

- :class:`ResumableSampler` is torch's :class:`~torch.utils.data.DistributedSampler` (permutation
  seeded by ``seed + epoch``; Lightning calls ``set_epoch`` at every epoch start) whose passes over
  one epoch can start at a given batch, so a run resumed mid-epoch continues the same permutation.
  Every pass over that epoch starts there, not only the first, so a callback that draws batches
  before the first training step (a sanity check, a probe) cannot use up the resume position.
- :func:`capture_rng_states` / :func:`restore_rng_states` copy the Python, NumPy, torch CPU and
  CUDA streams as plain tensors and numbers (checkpoints stay ``weights_only``-loadable).
- :class:`ResumableDataLoader` is the ``DataLoader`` that tells Lightning it resumes mid-epoch.

Example::

    sampler = ResumableSampler(50_000, batch_size=512, seed=0, epoch=3, start_batch=40)
    first = next(iter(sampler))  # the first index of batch 40 of epoch 3's permutation
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

__all__ = ["ResumableDataLoader", "ResumableSampler", "capture_rng_states", "restore_rng_states"]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` over ``range(length)`` whose next pass may start at ``start_batch``.

    One replica by default, so it also serves single-device runs; Lightning does not replace it
    with its own distributed sampler because it already is one.

    Args:
        length: Number of items to order.
        batch_size: Items per batch (the unit of ``start_batch``).
        num_replicas: Ranks sharing the data (padded to equal shares, as ``DistributedSampler``).
        rank: This rank.
        shuffle: Draw a fresh permutation per epoch (``False``: ascending order).
        seed: Base seed; epoch ``e`` uses ``seed + e``.
        drop_last: Drop the tail that does not split evenly across replicas.
        epoch: The epoch of the first pass.
        start_batch: Batches of that epoch already consumed: every pass over ``epoch`` skips them,
            until ``set_epoch`` moves to another epoch (which starts at batch 0).
        repeats: Repeated augmentation (Hoffer et al. 2020; DeiT, timm's ``RepeatAugSampler``):
            every index ``repeats`` times in a row in the epoch's permutation, so each image is seen
            ``repeats`` times per epoch, in the same batch (or on neighbouring ranks), each time
            with its own augmentation draw. The epoch has ``repeats * length`` items.

    Example::

        sampler = ResumableSampler(1000, batch_size=64, seed=0)
        sampler.set_epoch(1)
        order = list(sampler)  # a permutation of range(1000), different from epoch 0's
    """

    def __init__(
        self,
        length: int,
        batch_size: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        epoch: int = 0,
        start_batch: int = 0,
        repeats: int = 1,
    ) -> None:
        if repeats < 1:
            raise ValueError(f"aug_repeats must be an integer >= 1 (1: off; 3 in DeiT), got {repeats}")
        super().__init__(
            range(length * repeats),
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=seed,
            drop_last=drop_last,
        )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self.batch_size = batch_size
        super().set_epoch(epoch)
        self.start_batch = start_batch
        self.length = length
        self.repeats = repeats

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.start_batch = 0
        super().set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__()) if self.repeats == 1 else self._repeated_indices()
        return iter(indices[self.start_batch * self.batch_size :])

    def _repeated_indices(self) -> list[int]:
        """The ``seed + epoch`` permutation of ``range(length)``, each index ``repeats`` times in a row,
        padded (or cut) and split across ranks like ``DistributedSampler``.

        Hand-written because timm's ``RepeatAugSampler`` cuts the epoch back to ``length`` items (so
        an image is not seen ``repeats`` times per epoch) and cannot start mid-epoch.
        """
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.length, generator=generator)
        else:
            order = torch.arange(self.length)
        indices = order.repeat_interleave(self.repeats).tolist()
        total = self.total_size
        if not indices:
            return []
        indices = (indices * math.ceil(total / len(indices)))[:total]
        return indices[self.rank : total : self.num_replicas]


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` over a :class:`ResumableSampler` whose position the DataModule saves.

    ``state_dict`` is empty: the owning DataModule keeps the order's position and the random streams
    in its own state, and per-sample draws are a function of that position
    (:mod:`~lightning_tricks.datamodules.draws`). Present so Lightning treats the loader as
    resumable instead of warning that a mid-epoch resume is unreliable.

    Example::

        loader = ResumableDataLoader(dataset, batch_size=64, sampler=ResumableSampler(len(dataset), 64))
    """

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Nothing to load; see the class docstring."""


def capture_rng_states() -> dict[str, Any]:
    """The Python, NumPy, torch CPU and (initialised) CUDA random streams, ``weights_only``-safe.

    Example::

        states = capture_rng_states()
        torch.rand(3)
        restore_rng_states(states)  # the next torch.rand(3) repeats
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back the streams saved by :func:`capture_rng_states` (CUDA only with the same device count)."""
    random.setstate(states["python"])
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
