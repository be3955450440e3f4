"""Per-sample CPU augmentation: each draw is a function of (seed, epoch, position in the order),
the same with any number of workers, and drawn from the presets' own distribution."""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from data_files import make_tree

from lightning_tricks.datamodules import (
    PRESETS,
    DigitsDataModule,
    ImageFolderDataModule,
    ImageStatistics,
    InMemoryImageDataModule,
    ResumableSampler,
    SeededDraws,
    SeededDrawSampler,
    build_transform,
)
from lightning_tricks.datamodules.augment import PresetContext
from lightning_tricks.datamodules.draws import draw_seeds
from lightning_tricks.datamodules.in_memory import TransformedTensorDataset

N, BATCH = 30, 4


class LeftRight(InMemoryImageDataModule):
    """``n`` one-row images ``[i, n + i]``, so a served image tells its index and whether it was flipped."""

    num_classes, in_channels, image_size = 2, 1, 2

    def __init__(self, n: int, **kwargs) -> None:
        super().__init__(normalize=False, augment="flip", augment_on_device=False, **kwargs)
        self.n = n

    def load_splits(self):
        row = torch.stack([torch.arange(self.n), self.n + torch.arange(self.n)], dim=1)
        return {"train": (row.float().view(self.n, 1, 1, 2), torch.arange(self.n) % 2)}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """As in DataLoader workers: tiny per-sample ops on several threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _digits_epochs(num_workers: int, persistent: bool | None = None) -> list[list[torch.Tensor]]:
    data = DigitsDataModule(
        batch_size=64,
        train_per_class=40,
        augment=["crop_flip", "salt_pepper", "noise"],
        augment_on_device=False,
        aug_repeats=2,
        bootstrap_seed=1,
        num_workers=num_workers,
        persistent_workers=persistent,
        seed=3,
    )
    data.setup("fit")
    loader = data.train_dataloader()
    epochs = []
    with one_thread():
        for epoch in (0, 1):
            loader.sampler.set_epoch(epoch)  # Lightning's call at every epoch start
            epochs.append([images for images, _ in loader])
    return epochs


@pytest.fixture(scope="module")
def main_process_epochs() -> list[list[torch.Tensor]]:
    return _digits_epochs(num_workers=0)


@pytest.mark.parametrize("persistent", [True, False], ids=["persistent", "fresh_workers"])
def test_workers_serve_the_batches_of_the_main_process(main_process_epochs, persistent):
    worker_epochs = _digits_epochs(num_workers=2, persistent=persistent)
    for served, expected in zip(worker_epochs, main_process_epochs, strict=True):
        assert len(served) == len(expected) == 13  # 2 x 400 bootstrap draws in batches of 64
        assert all(torch.equal(a, b) for a, b in zip(served, expected, strict=True))


def test_image_folder_batches_do_not_depend_on_workers(tmp_path):
    make_tree(tmp_path)
    served = []
    for workers in (0, 2):
        data = ImageFolderDataModule(
            tmp_path,
            augment=["inception", "flip", "color_jitter"],
            crop_size=32,
            resize_size=40,
            batch_size=4,
            num_workers=workers,
            stats_cache=None,
        )
        data.setup("fit")
        with one_thread():
            served.append(torch.cat([images for images, _ in data.train_dataloader()]))
    assert torch.equal(served[0], served[1])


def test_each_item_is_its_transform_under_the_seed_of_its_position():
    images = torch.randint(0, 256, (N, 3, 8, 8), dtype=torch.uint8)
    transform = build_transform(["crop_flip", "noise"], PresetContext(size=8))
    dataset = SeededDraws(TransformedTensorDataset(images, torch.arange(N), transform))
    order = list(ResumableSampler(N, batch_size=BATCH, seed=5, epoch=2))
    seeds = draw_seeds(5, 2, N)
    items = list(SeededDrawSampler(N, batch_size=BATCH, seed=5, epoch=2, start_batch=3))

    assert [index for index, _ in items] == order[3 * BATCH :]
    assert [seed for _, seed in items] == seeds[3 * BATCH :].tolist()
    caller_stream = torch.get_rng_state()
    served = [dataset[item] for item in items]
    assert torch.equal(torch.get_rng_state(), caller_stream)  # the caller's stream is left as it was
    for (index, seed), (image, label) in zip(items, served, strict=True):
        torch.manual_seed(seed)
        assert label == index and torch.equal(image, transform(images[index]))
    # Another epoch or another DataModule seed: other seeds at every position.
    assert not set(seeds.tolist()) & set(draw_seeds(5, 3, N).tolist())
    assert not set(seeds.tolist()) & set(draw_seeds(6, 2, N).tolist())
    # A sampler without seeds (Lightning's for overfit_batches) draws from the current stream.
    torch.manual_seed(7)
    plain, _ = dataset[3]
    torch.manual_seed(7)
    assert torch.equal(plain, transform(images[3]))


def test_ranks_get_the_seeds_of_their_positions_in_the_whole_order():
    whole = list(SeededDrawSampler(N, batch_size=BATCH, seed=0, epoch=1))
    shares = [list(SeededDrawSampler(N, BATCH, num_replicas=4, rank=r, seed=0, epoch=1)) for r in range(4)]
    for rank, share in enumerate(shares):
        assert len(share) == 8  # ceil(30 / 4), padded like DistributedSampler
        for k, item in enumerate(share):
            if rank + 4 * k < N:  # a padding item repeats an index with a seed of its own
                assert item == whole[rank + 4 * k]
    assert len({seed for share in shares for _, seed in share}) == 32


def test_flip_rate_and_independence_of_draws_stay_binomial():
    n = 2000
    data = LeftRight(n, batch_size=500, aug_repeats=2, seed=0)
    data.setup("fit")
    loader = data.train_dataloader()
    flips = []
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        with one_thread():
            served = torch.cat([x for x, _ in loader]).view(-1, 2)
        index, flipped = served.amin(dim=1).long(), served[:, 0] > served[:, 1]
        first, second = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
        # aug_repeats puts an image's two copies side by side in the epoch's order.
        pairs = index.view(n, 2)
        assert torch.equal(pairs[:, 0], pairs[:, 1])
        first[pairs[:, 0]], second[pairs[:, 0]] = flipped.view(n, 2).unbind(1)
        flips.append((first, second))

    def within_binomial(hits: torch.Tensor, p: float = 0.5) -> bool:
        trials = hits.numel()
        bound = 4.5 * math.sqrt(p * (1 - p) / trials)  # ~1e-5 two-sided for a fair draw
        return abs(hits.float().mean().item() - p) < bound

    (first0, second0), (first1, _) = flips
    assert within_binomial(torch.cat([first0, second0, first1]))  # the preset's flip rate p = 0.5
    assert within_binomial(first0 == second0)  # an image's copies flip independently
    assert within_binomial(first0 == first1)  # and so does an image from epoch to epoch


@pytest.mark.parametrize("name", sorted(set(PRESETS) - {"none"}))
def test_presets_draw_only_from_torch(name):
    """The draw seeds only torch's CPU generator: no preset may draw from Python's or NumPy's."""
    images = torch.randint(0, 256, (4, 3, 48, 48), dtype=torch.uint8)
    context = PresetContext(size=48, stats=ImageStatistics().fit(images.float() / 255))
    transform = build_transform([name], context)
    python, numpy_state = random.getstate(), np.random.get_state()
    for image in images:
        transform(image)
    assert random.getstate() == python
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state, strict=True))
