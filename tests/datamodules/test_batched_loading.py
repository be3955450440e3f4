"""Batched in-memory loading: exact epochs, seeded per-epoch order, and a resumable position."""

from __future__ import annotations

import contextlib
import itertools
import warnings

import lightning as L
import pytest
import torch
from helpers import Interrupted, StopAtStep, quiet_trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.datamodules import (
    DigitsDataModule,
    InMemoryImageDataModule,
    ResumableSampler,
    SyntheticDataModule,
    TensorBatchLoader,
)

N, BATCH = 44, 8  # 6 batches per epoch, the last one partial


class IndexImages(InMemoryImageDataModule):
    """Image ``i`` is one row ``[i, N + i]``, so a batch tells which rows it holds and which it flipped."""

    num_classes, in_channels, image_size = 4, 1, 1

    def load_splits(self):
        images = torch.stack([torch.arange(N), N + torch.arange(N)], dim=1).float().view(N, 1, 1, 2)
        return {"train": (images, torch.arange(N) % 4)}


class RecordOrder(L.LightningModule):
    """Records the row indices and images of every training batch and one draw of the global stream."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 4)
        self.rows: list[list[int]] = []
        self.images: list[list[list[float]]] = []
        self.draws: list[float] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.rows.append(images.flatten(1).amin(1).long().tolist())
        self.images.append(images.flatten(1).tolist())
        self.draws.append(torch.rand(()).item())  # stands in for dropout masks and augmentation draws
        return F.cross_entropy(self.layer(images.flatten(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callbacks=(), ckpt_path=None, max_epochs=3, **data_kwargs) -> RecordOrder:
    L.seed_everything(0, verbose=False)
    model = RecordOrder()
    kwargs = {**quiet_trainer_kwargs(tmp_path), "enable_checkpointing": True}
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=list(callbacks), **kwargs)
    data = IndexImages(batch_size=BATCH, normalize=False, **data_kwargs)
    with contextlib.suppress(Interrupted):
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


def test_every_index_exactly_once_per_epoch_in_a_new_order_each_epoch():
    sampler = ResumableSampler(N, batch_size=BATCH, seed=3)
    loader = TensorBatchLoader((torch.arange(N),), BATCH, sampler)
    epochs = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = [rows.tolist() for (rows,) in loader]
        assert [len(b) for b in batches] == [8, 8, 8, 8, 8, 4] and len(loader) == 6
        order = list(itertools.chain(*batches))
        assert sorted(order) == list(range(N))
        epochs.append(order)
    assert len({tuple(order) for order in epochs}) == 3
    # Same seed and epoch -> same order: the permutation torch's DistributedSampler draws.
    sampler.set_epoch(1)
    assert torch.cat([rows for (rows,) in loader]).tolist() == epochs[1]
    expected = torch.randperm(N, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    assert epochs[1] == expected
    other_seed = ResumableSampler(N, batch_size=BATCH, seed=4)
    other_seed.set_epoch(1)
    assert list(other_seed) != epochs[1]


def test_ranks_share_an_epoch_without_overlap_beyond_the_padding():
    shares = [list(ResumableSampler(N, BATCH, num_replicas=3, rank=r, seed=0)) for r in range(3)]
    assert {len(s) for s in shares} == {15}  # ceil(44 / 3), as DistributedSampler pads
    union = list(itertools.chain(*shares))
    assert sorted(set(union)) == list(range(N)) and len(union) - N == 1


def test_batches_equal_a_per_sample_dataloader_over_the_same_order():
    images = torch.randint(0, 256, (N, 3, 4, 4), dtype=torch.uint8)
    labels = torch.randint(0, 10, (N,))
    batched = list(TensorBatchLoader((images, labels), BATCH, ResumableSampler(N, BATCH, seed=5)))
    reference = DataLoader(
        TensorDataset(images, labels), batch_size=BATCH, sampler=ResumableSampler(N, seed=5)
    )
    for (x, y), (ref_x, ref_y) in zip(batched, reference, strict=True):
        assert torch.equal(x, ref_x) and torch.equal(y, ref_y)


def test_start_batch_holds_for_every_pass_of_its_epoch_then_later_epochs_are_whole():
    sampler = ResumableSampler(N, batch_size=BATCH, seed=0, epoch=2, start_batch=4)
    full = ResumableSampler(N, batch_size=BATCH, seed=0, epoch=2)
    # A probe's pass before training does not use up the resume position of the real pass.
    assert list(sampler) == list(full)[4 * BATCH :]
    sampler.set_epoch(2)  # Lightning's call at the start of the resumed epoch
    assert list(sampler) == list(full)[4 * BATCH :]
    sampler.set_epoch(3)
    full.set_epoch(3)
    assert list(sampler) == list(full)
    sampler.set_epoch(2)  # an epoch seen again (reloaded loaders) starts at its beginning
    full.set_epoch(2)
    assert list(sampler) == list(full)


def test_datamodule_trains_on_batched_loader_with_same_statistics():
    dm = DigitsDataModule(batch_size=64)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert isinstance(loader, TensorBatchLoader)
    labels = torch.cat([y for _, y in loader])
    assert torch.equal(labels.sort().values, dm._splits["train"].tensors[1].sort().values)


PER_SAMPLE = {"augment": "flip", "augment_on_device": False}


@pytest.mark.parametrize(
    ("interrupt_step", "data", "workers"),
    [
        (8, {}, 0),
        (6, {}, 0),
        # Flipped per sample on the CPU: the uninterrupted run in the main process, the interrupted
        # and the resumed run in two workers, which fetch batches ahead of training.
        (8, PER_SAMPLE, 2),
    ],
    ids=["mid_epoch", "epoch_end", "per_sample_mid_epoch"],
)
def test_resumed_run_sees_the_uninterrupted_order_and_random_stream(tmp_path, interrupt_step, data, workers):
    uninterrupted = _fit(tmp_path / "a", **data)
    epochs = [list(itertools.chain(*uninterrupted.rows[e * 6 : (e + 1) * 6])) for e in range(3)]
    assert all(sorted(order) == list(range(N)) for order in epochs) and len(set(map(tuple, epochs))) == 3

    folder = tmp_path / "b" / "ckpt"
    checkpoints = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1, save_last=True)
    interrupted = _fit(tmp_path / "b", [checkpoints, StopAtStep(interrupt_step)], num_workers=workers, **data)
    assert len(interrupted.rows) == interrupt_step
    ckpt = next(folder.glob(f"*step={interrupt_step}.ckpt"))
    state = torch.load(ckpt, weights_only=True)["IndexImages"]["data_order"]
    assert state == {"epoch": interrupt_step // 6, "batches_consumed": interrupt_step % 6}

    with warnings.catch_warnings():  # the loader says it resumes mid-epoch, and it does
        warnings.filterwarnings("error", message=r".*dataloader is\s+not resumable")
        resumed = _fit(tmp_path / "b", ckpt_path=ckpt, num_workers=workers, **data)
    assert interrupted.rows + resumed.rows == uninterrupted.rows
    assert interrupted.images + resumed.images == uninterrupted.images
    assert interrupted.draws + resumed.draws == uninterrupted.draws
    assert torch.equal(resumed.layer.weight, uninterrupted.layer.weight)
    if data:  # the flips are drawn, not all the same way
        flipped = [image[0] > image[1] for batch in uninterrupted.images for image in batch]
        assert 0 < sum(flipped) < len(flipped)


def test_repeated_augmentation_serves_every_index_k_times_per_epoch_in_groups():
    sampler = ResumableSampler(N, batch_size=BATCH, seed=3, repeats=3)
    loader = TensorBatchLoader((torch.arange(N),), BATCH, sampler)
    assert len(sampler) == 3 * N and len(loader) == 17  # ceil(132 / 8)
    orders = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        order = torch.cat([rows for (rows,) in loader])
        assert torch.equal(torch.bincount(order, minlength=N), torch.full((N,), 3))
        # The copies of an image are neighbours (in one batch unless a batch boundary splits them),
        # and the images come in the epoch's seeded permutation.
        groups = order.view(N, 3)
        assert torch.equal(groups, groups[:, :1].expand(N, 3))
        permutation = torch.randperm(N, generator=torch.Generator().manual_seed(3 + epoch))
        assert torch.equal(groups[:, 0], permutation)
        orders.append(order)
    assert not torch.equal(orders[0], orders[1])


def test_repeated_augmentation_splits_copies_across_ranks():
    shares = [ResumableSampler(N, BATCH, num_replicas=3, rank=r, seed=0, repeats=3) for r in range(3)]
    assert {len(s) for s in shares} == {N}
    for share in shares:  # with k = ranks, each rank sees every image once, on its own augmentation draw
        assert sorted(share) == list(range(N))


def test_repeated_copies_get_different_augmentations_on_the_device():
    data = DigitsDataModule(batch_size=30, augment=["crop_flip", "salt_pepper"], aug_repeats=3, seed=1)
    data.setup("fit")
    images, labels = next(iter(data.train_dataloader()))
    groups = images.view(10, 3, *images.shape[1:])
    assert all(torch.equal(group[0], group[c]) for group in groups for c in (1, 2))  # the same image...
    augmented = data.augment_batch(images, labels)[0].view_as(groups)
    for group in augmented:  # ...augmented three different ways
        assert not torch.equal(group[0], group[1]) and not torch.equal(group[1], group[2])
        assert not torch.equal(group[0], group[2])


def test_resumed_run_with_repeated_augmentation_sees_the_uninterrupted_order(tmp_path):
    uninterrupted = _fit(tmp_path / "a", max_epochs=2, aug_repeats=3)
    assert len(uninterrupted.rows) == 34  # 17 batches of the 132 repeated items per epoch
    folder = tmp_path / "b" / "ckpt"
    checkpoints = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1)
    interrupted = _fit(tmp_path / "b", [checkpoints, StopAtStep(21)], max_epochs=2, aug_repeats=3)
    ckpt = next(folder.glob("*step=21.ckpt"))
    assert torch.load(ckpt, weights_only=True)["IndexImages"]["data_order"] == {
        "epoch": 1,
        "batches_consumed": 4,
    }
    resumed = _fit(tmp_path / "b", ckpt_path=ckpt, max_epochs=2, aug_repeats=3)
    assert interrupted.rows + resumed.rows == uninterrupted.rows
    assert interrupted.draws + resumed.draws == uninterrupted.draws


def test_subclass_without_load_splits_fails_at_construction():
    class NoSplits(InMemoryImageDataModule):
        num_classes, in_channels, image_size = 2, 1, 4

    with pytest.raises(TypeError, match=r"abstract method.*load_splits"):
        NoSplits()


def test_data_on_device_needs_the_batched_path():
    with pytest.raises(ValueError, match=r"data_on_device=True.*augment_on_device=True"):
        SyntheticDataModule(augment="flip", augment_on_device=False, data_on_device=True)
