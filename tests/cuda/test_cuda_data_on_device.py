"""On a GPU, ``data_on_device: true`` serves a training epoch without host -> device copies.

One epoch of a CIFAR-shaped :class:`~lightning_tricks.datamodules.SyntheticDataModule` is consumed as
Lightning consumes it (iterate ``train_dataloader()``, ``.to(device, non_blocking=True)``,
``on_after_batch_transfer`` with the batched on-device flip + translate) under ``torch.profiler``
with CUDA activity; the CUDA ``Memcpy HtoD`` events are counted. The loader uploads the epoch's
order (8 bytes per image) once, when the epoch's first batch is drawn: that draw happens before the
profiler starts (its transfer and augmentation inside), as Lightning draws it at the epoch start.
The same epoch with the data on the host must show one upload per batch, so the count is real.
"""

from __future__ import annotations

import itertools

import lightning as L
import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from lightning_tricks.datamodules import SyntheticDataModule

pytestmark = pytest.mark.cuda

BATCHES = 4


def host_to_device_copies(data_on_device: bool) -> tuple[list[str], int]:
    """The ``Memcpy HtoD`` events and the number of batches of one training epoch."""
    dm = SyntheticDataModule(
        num_train=32 * BATCHES,
        num_val=0,
        num_test=0,
        batch_size=32,
        augment="crop_flip",
        flip_mode="alternating",
        data_on_device=data_on_device,
    )
    trainer = L.Trainer(accelerator="cuda", devices=1, logger=False, enable_progress_bar=False)
    trainer.training = True  # the DataModule augments training batches, as in fit
    dm.trainer = trainer
    dm.setup("fit")
    device = torch.device("cuda", torch.cuda.current_device())
    for images, labels in dm.train_dataloader():  # warm-up epoch: statistics cached on the device
        dm.on_after_batch_transfer((images.to(device), labels.to(device)), 0)
    batches = iter(dm.train_dataloader())
    first = next(batches)  # uploads the epoch's order when data_on_device
    torch.cuda.synchronize()
    seen = 0
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for images, labels in itertools.chain([first], batches):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            images, labels = dm.on_after_batch_transfer((images, labels), 0)
            assert images.device == device and images.dtype == torch.float32
            seen += 1
        torch.cuda.synchronize()
    copies = [e.name for e in prof.events() if "Memcpy HtoD" in e.name]
    return copies, seen


def test_data_on_device_epoch_copies_nothing_from_the_host():
    host_copies, host_batches = host_to_device_copies(data_on_device=False)
    assert host_batches == BATCHES
    # images and labels of every batch: the profiler sees copies (else this test could not fail)
    assert len(host_copies) >= BATCHES, f"the profiler recorded no host->device copies: {host_copies}"
    copies, batches = host_to_device_copies(data_on_device=True)
    assert batches == BATCHES
    assert copies == []
