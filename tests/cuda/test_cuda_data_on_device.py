"""On a GPU, ``data_on_device: true`` serves a training epoch without host -> device copies.

One epoch of a CIFAR-shaped :class:`~lightning_tricks.datamodules.SyntheticDataModule` is consumed as
Lightning consumes it (iterate ``train_dataloader()``, ``.to(device, non_blocking=True)``,
``on_after_batch_transfer`` with the batched on-device flip + translate) under ``torch.profiler``
with CUDA activity; the host -> device copies the GPU ran are counted. The loader uploads the
epoch's order (8 bytes per image) once, when the epoch's first batch is drawn: that draw happens
before the profiler starts (its transfer and augmentation inside), as Lightning draws it at the
epoch start. The same epoch with the data on the host must show one upload per batch, and a
deliberate upload (pageable and pinned) must be counted while a device -> device copy is not, so a
count of zero cannot come from a profiler that names or records copies differently.

Kineto (torch's CUDA profiler; the format string is in torch 2.14's libtorch_cpu.so) names CUPTI's
memcpy records ``Memcpy {HtoD|DtoH|DtoD|...} ({source memory} -> {destination memory})``, e.g.
``Memcpy HtoD (Pageable -> Device)`` or ``Memcpy HtoD (Pinned -> Device)``; the host-side runtime
call (``cudaMemcpyAsync``) does not say the direction, so only the GPU's records are counted.
"""

from __future__ import annotations

import itertools
import re

import lightning as L
import pytest
import torch
from torch.profiler import DeviceType, ProfilerActivity, profile

from lightning_tricks.datamodules import SyntheticDataModule

pytestmark = pytest.mark.cuda

BATCHES = 4
# Kineto's "Memcpy HtoD (...)"; also "h2d" / "HostToDevice", which other CUDA tracers use.
HOST_TO_DEVICE = re.compile(r"memcpy.*(htod|h2d|host\s*to\s*device)", re.IGNORECASE)


def host_to_device_copies_in(prof: profile) -> list[str]:
    """The names of the host -> device copies the GPU ran while ``prof`` recorded."""
    return [
        e.name for e in prof.events() if e.device_type != DeviceType.CPU and HOST_TO_DEVICE.search(e.name)
    ]


def copy_event_names(prof: profile) -> list[str]:
    """Every recorded name that mentions a copy: what a failing assertion shows."""
    return sorted({e.name for e in prof.events() if "memcpy" in e.name.lower() or "copy" in e.name.lower()})


def test_the_counter_sees_a_deliberate_upload_and_not_a_device_copy():
    device = torch.device("cuda", torch.cuda.current_device())
    pageable, pinned = torch.arange(4096.0), torch.arange(4096.0).pin_memory()
    on_device = torch.arange(4096.0, device=device)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        pageable.to(device)
        pinned.to(device, non_blocking=True)
        torch.cuda.synchronize()
    uploads = host_to_device_copies_in(prof)
    assert len(uploads) >= 2, (
        f"expected 2 host->device copies, counted {uploads}; recorded: {copy_event_names(prof)}"
    )
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        on_device.clone()
        on_device.cpu()  # device -> host
        torch.cuda.synchronize()
    assert host_to_device_copies_in(prof) == [], copy_event_names(prof)


def host_to_device_copies(data_on_device: bool) -> tuple[list[str], int]:
    """The host -> device copies and the number of batches of one training epoch."""
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
    return host_to_device_copies_in(prof), seen


def test_data_on_device_epoch_copies_nothing_from_the_host():
    host_copies, host_batches = host_to_device_copies(data_on_device=False)
    assert host_batches == BATCHES
    # images and labels of every batch: the profiler sees copies (else this test could not fail)
    assert len(host_copies) >= BATCHES, f"the profiler recorded no host->device copies: {host_copies}"
    copies, batches = host_to_device_copies(data_on_device=True)
    assert batches == BATCHES
    assert copies == []
