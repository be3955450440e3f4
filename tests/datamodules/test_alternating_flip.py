"""airbench's alternating flip: random in epoch 0, then every image the other way each epoch; resumable."""

from __future__ import annotations

import contextlib

import lightning as L
import pytest
import torch
from helpers import Interrupted, StopAtStep, quiet_trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F

from lightning_tricks.datamodules import InMemoryImageDataModule, ResumableSampler, TensorBatchLoader
from lightning_tricks.datamodules.flip import AlternatingFlip

N, BATCH = 44, 8  # 6 batches per epoch, the last one partial


def _pair_images(n: int) -> torch.Tensor:
    """Image ``i`` is one row of two pixels ``[2i, 2i + 1]``: flipped it reads ``[2i + 1, 2i]``."""
    return torch.arange(2 * n, dtype=torch.float32).view(n, 1, 1, 2)


def _decode(images: torch.Tensor) -> tuple[list[int], list[bool]]:
    """The dataset index and flip state of each image of a batch of :func:`_pair_images`."""
    left, right = images[:, 0, 0, 0], images[:, 0, 0, 1]
    return (torch.minimum(left, right) // 2).long().tolist(), (left > right).tolist()


class PairImages(InMemoryImageDataModule):
    """Images from :func:`_pair_images`; translation is off (pad 0), so only flips move pixels."""

    num_classes, in_channels, image_size = 4, 1, 2
    size = N

    def __init__(self, augment="crop_flip", **kwargs) -> None:
        options = {"crop_flip": {"pad": 0}} if augment == "crop_flip" else None
        super().__init__(augment=augment, augment_kwargs=options, normalize=False, **kwargs)

    def load_splits(self):
        return {"train": (_pair_images(self.size), torch.arange(self.size) % 4)}


def _epoch_flips(data: InMemoryImageDataModule, epochs: int) -> torch.Tensor:
    """``(epochs, n)`` flip states by dataset index, read from the training loader's batches."""
    data.setup("fit")
    loader = data.train_dataloader()
    flips = torch.zeros(epochs, data.size, dtype=torch.bool)
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        seen = []
        for images, _ in loader:
            images, _ = data.augment_batch(images, None)
            index, flipped = _decode(images)
            flips[epoch, index] = torch.tensor(flipped)
            seen += index
        assert sorted(seen) == list(range(data.size))  # every image exactly once per epoch
    return flips


def test_each_image_is_random_in_epoch_zero_then_flips_the_other_way_every_epoch():
    PairImages.size = 400
    flips = _epoch_flips(PairImages(batch_size=64, augment="crop_flip", flip_mode="alternating"), 4)
    # airbench's rule: flipped in epoch e iff (flipped in epoch 0) XOR (e is odd).
    for epoch in range(1, 4):
        assert torch.equal(flips[epoch], flips[0] ^ bool(epoch % 2))
    assert 0.4 < flips[0].float().mean() < 0.6  # p = 0.5 in epoch 0 (400 draws: sd 0.025)
    other_seed = _epoch_flips(PairImages(batch_size=64, augment="flip", flip_mode="alternating", seed=1), 1)
    assert 0.3 < (other_seed[0] != flips[0]).float().mean() < 0.7  # the epoch-0 draw follows the seed
    # The default stays random: about half the images keep their state from one epoch to the next.
    random = _epoch_flips(PairImages(batch_size=64, augment="flip"), 2)
    assert 0.35 < (random[0] == random[1]).float().mean() < 0.65


class RecordFlips(L.LightningModule):
    """Records ``(index, flipped)`` of every training image, batch by batch."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 4)
        self.seen: list[tuple[list[int], list[bool]]] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.seen.append(_decode(images))
        return F.cross_entropy(self.layer(images.flatten(1)), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(tmp_path, callbacks=(), ckpt_path=None, data_on_device=False) -> RecordFlips:
    PairImages.size = N
    L.seed_everything(0, verbose=False)
    model = RecordFlips()
    kwargs = {**quiet_trainer_kwargs(tmp_path), "enable_checkpointing": True}
    trainer = L.Trainer(max_epochs=3, callbacks=list(callbacks), **kwargs)
    data = PairImages(
        batch_size=BATCH, augment="crop_flip", flip_mode="alternating", data_on_device=data_on_device
    )
    with contextlib.suppress(Interrupted):
        trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model


@pytest.mark.parametrize("data_on_device", [False, True], ids=["host", "data_on_device"])
def test_resumed_run_flips_every_image_as_the_uninterrupted_run(tmp_path, data_on_device):
    uninterrupted = _fit(tmp_path / "a", data_on_device=data_on_device)
    by_epoch = []
    for epoch in range(3):
        states = {}
        for index, flipped in uninterrupted.seen[epoch * 6 : (epoch + 1) * 6]:
            states.update(zip(index, flipped, strict=True))
        by_epoch.append(states)
    assert all(sorted(states) == list(range(N)) for states in by_epoch)
    assert all(by_epoch[1][i] != by_epoch[0][i] and by_epoch[2][i] == by_epoch[0][i] for i in range(N))

    folder = tmp_path / "b" / "ckpt"
    checkpoints = ModelCheckpoint(dirpath=folder, every_n_train_steps=1, save_top_k=-1)
    interrupted = _fit(tmp_path / "b", [checkpoints, StopAtStep(8)], data_on_device=data_on_device)
    ckpt = next(folder.glob("*step=8.ckpt"))  # mid-way through epoch 1
    resumed = _fit(tmp_path / "b", ckpt_path=ckpt, data_on_device=data_on_device)
    assert interrupted.seen + resumed.seen == uninterrupted.seen


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))],
)
def test_loader_flips_device_resident_images_by_their_dataset_index(device):
    images, labels = _pair_images(20).to(device), torch.arange(20, device=device)
    flip = AlternatingFlip(20, seed=3, device=device)
    sampler = ResumableSampler(20, batch_size=6, seed=0, epoch=1)
    index = torch.arange(19, -1, -1)  # positions map to rows in reverse (as a bootstrap index would)
    (batch, rows), *_ = TensorBatchLoader((images, labels), 6, sampler, index=index, flip=flip)
    assert batch.device.type == device
    order = index[torch.as_tensor(list(sampler))[:6]]
    expected = flip.first_epoch.cpu()[order] ^ True  # epoch 1: the other way from epoch 0
    decoded_index, flipped = _decode(batch.cpu())
    assert decoded_index == order.tolist() == rows.cpu().tolist()
    assert flipped == expected.tolist()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"augment": "crop_flip", "flip_mode": "sometimes"},
            r"flip_mode='sometimes' is not one of \['random', 'alternating'\]",
        ),
        (
            {"augment": "translate", "flip_mode": "alternating"},
            r"no flip to alternate.*add one of them to augment",
        ),
        (
            {"augment": "flip", "flip_mode": "alternating", "augment_on_device": False},
            r"augment_on_device=False.*set augment_on_device=True or flip_mode: random",
        ),
    ],
)
def test_bad_flip_mode_is_refused_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PairImages(**kwargs)
