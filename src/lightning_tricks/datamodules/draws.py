"""Per-sample augmentation draws as a function of (seed, epoch, position in the epoch's order).

The per-sample CPU path runs ``transforms.v2`` presets in ``DataLoader`` workers, and they draw
from torch's global CPU generator. Torch seeds that generator once per worker, not per sample, so
an image's draw would depend on ``num_workers``, on which worker fetched it and on what that worker
drew before: a run resumed mid-epoch would get other draws than the run that was never stopped.
Here every sample gets its own seed instead:

- :class:`SeededDrawSampler` is the :class:`~lightning_tricks.datamodules.order.ResumableSampler`
  whose items are ``(index, draw_seed)``, ``draw_seed`` being entry ``position`` of a seeded
  per-epoch vector (:func:`draw_seeds`), where ``position`` is the item's place in the epoch's
  whole order (before it is split across ranks; with ``aug_repeats`` each copy has its own place);
- :class:`SeededDraws` wraps the dataset and fetches ``dataset[index]`` with torch's CPU generator
  seeded with ``draw_seed``, restoring the generator afterwards.

So an augmented sample depends only on the DataModule's ``seed``, the epoch and its position: not
on workers, their scheduling or persistence, nor on where a run was stopped and resumed, and the
number of ranks changes only the padding. Every preset draws from torch's CPU generator only
(torchvision's ``transforms.v2`` and the hand-written ``pca_lighting``, ``salt_pepper`` and
``lens_distortion`` use neither Python's ``random`` nor NumPy's), so that generator is the one
seeded.

Example::

    sampler = SeededDrawSampler(len(dataset), batch_size=64, seed=0)
    loader = DataLoader(SeededDraws(dataset), batch_size=64, sampler=sampler, num_workers=4)
    sampler.set_epoch(1)  # Lightning does this at every epoch start
    images, labels = next(iter(loader))  # the same tensors with any num_workers
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from lightning_tricks.datamodules.order import ResumableSampler

__all__ = ["SeededDrawSampler", "SeededDraws", "draw_seeds"]

# Mixed into the entropy so the draw seeds are not related to the permutation's ``seed + epoch``.
_DRAW_SALT = 0xD7A3


def draw_seeds(seed: int, epoch: int, count: int) -> np.ndarray:
    """``count`` seeds in ``[0, 2**63)`` for the positions of ``epoch``'s order: int64 ``(count,)``.

    NumPy's ``SeedSequence`` hashes ``(seed, epoch)`` into the generator's state, so neighbouring
    seeds or epochs give unrelated vectors (unlike ``seed + epoch``).

    Example::

        draw_seeds(0, epoch=1, count=4)[2]  # the seed of position 2 of epoch 1, on every rank
    """
    generator = np.random.default_rng((_DRAW_SALT, seed % 2**64, epoch))
    return generator.integers(2**63, size=count, dtype=np.int64)


class SeededDrawSampler(ResumableSampler):
    """:class:`~lightning_tricks.datamodules.order.ResumableSampler` yielding ``(index, draw_seed)``.

    ``draw_seed`` is :func:`draw_seeds` of the sampler's ``seed`` and ``epoch`` at the item's position
    in the epoch's whole order (all ranks, padding and repeats included), so a pass that starts at
    ``start_batch`` continues the seeds of the uninterrupted pass. Arguments as the base class.

    Example::

        sampler = SeededDrawSampler(1000, batch_size=64, seed=0, epoch=2, start_batch=5)
        index, seed = next(iter(sampler))  # batch 5 of epoch 2, its first item and its seed
    """

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())
        skipped = self.start_batch * self.batch_size
        seeds = draw_seeds(self.seed, self.epoch, self.total_size)[self.rank :: self.num_replicas]
        return zip(indices, seeds[skipped:].tolist(), strict=True)


class SeededDraws(Dataset):
    """``dataset[index]`` fetched with torch's CPU generator seeded by the item's ``draw_seed``.

    Items are ``(index, draw_seed)`` from :class:`SeededDrawSampler`; a plain ``index`` (a sampler
    that carries no seeds, e.g. the sequential one Lightning puts in for ``overfit_batches``)
    fetches ``dataset[index]`` from the current stream, as any dataset would. The generator's
    state is restored after each item, so the stream the caller sees (the training loop's, with
    ``num_workers=0``) is left as it was. Hand-written because torch's ``DataLoader`` seeds
    workers, not samples.

    Example::

        dataset = SeededDraws(TransformedTensorDataset(images, labels, v2.RandomHorizontalFlip()))
        first, again = dataset[(3, 1234)], dataset[(3, 1234)]  # the same flip of image 3
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int] | int) -> Any:
        if isinstance(item, numbers.Integral):
            return self.dataset[item]
        index, draw_seed = item
        # Only the CPU generator: torch.manual_seed would also reseed (and leave reseeded) CUDA's.
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(draw_seed)
            return self.dataset[index]
