"""Augmentation throughput (images/s) of the CIFAR standard (pad 4, random 32 crop, h-flip).

Three ways to augment CIFAR-shaped uint8 images in batches of 512:

* ``per_sample_cpu``: torchvision ``transforms.v2`` per sample in a Dataset, DataLoader workers
  (the usual PyTorch pipeline; every image goes through Python).
* ``batched_cpu``: the same v2 transforms applied once to a whole batch tensor (fast, but v2
  draws ONE crop/flip for the whole batch, so it is not the same augmentation).
* ``on_device``: :class:`~lightning_tricks.datamodules.on_device.OnDeviceAugment`, per-image
  random crops and flips in one vectorised gather, on the CPU and, when available, on CUDA.

Run::

    python benchmarks/augment_throughput.py           # --quick for a short run

Writes ``benchmarks/results/augment_throughput.json``; ratio ``on_device_vs_per_sample_cpu`` is
the CPU on-device throughput divided by the per-sample CPU throughput (target >= 10).

This times the augmentation kernel on a ready-made batch only. What training actually receives
(loader, host-to-device copy, augmentation and normalisation together) is measured end to end by
``benchmarks/data_throughput.py``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from lightning_tricks.datamodules.in_memory import TransformedTensorDataset
from lightning_tricks.datamodules.on_device import OnDeviceAugment

try:
    from _report import result_path, write_result
except ModuleNotFoundError:  # imported from outside benchmarks/, which running a script puts on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import result_path, write_result

BATCH = 512


def cifar_standard() -> v2.Compose:
    return v2.Compose([v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip()])


def per_sample_cpu(images: torch.Tensor, labels: torch.Tensor, workers: int, batches: int) -> float:
    dataset = TransformedTensorDataset(images, labels, cifar_standard())
    loader = DataLoader(
        dataset, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=False
    )
    iterator = iter(loader)
    next(iterator)  # worker start-up is not augmentation time
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * BATCH / (time.perf_counter() - start)


def time_batched(step: Callable[[], torch.Tensor], batches: int, cuda: bool = False) -> float:
    for _ in range(3):
        step()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        step()
    if cuda:
        torch.cuda.synchronize()
    return batches * BATCH / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer batches")
    parser.add_argument("--workers", type=int, default=min(2, len(os.sched_getaffinity(0))))
    parser.add_argument("--out", default=str(result_path("augment_throughput")))
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    n = BATCH * (12 if args.quick else 24)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, 10, (n,), generator=generator)
    batches = 8 if args.quick else 20
    augment = OnDeviceAugment(["crop_flip"], pad=4, pad_mode="reflect")
    batch = images[:BATCH]
    transform = cifar_standard()

    results = {
        f"per_sample_cpu/{args.workers}_workers": per_sample_cpu(images, labels, args.workers, batches),
        "batched_cpu/v2_one_draw_per_batch": time_batched(lambda: transform(batch), batches * 4),
        "on_device/cpu": time_batched(lambda: augment(batch), batches * 4),
    }
    if torch.cuda.is_available():
        gpu_batch = batch.cuda()
        results["on_device/cuda"] = time_batched(lambda: augment(gpu_batch), batches * 50, cuda=True)

    print(f"{'case':36} {'images/s':>14}")
    rows = []
    for case, value in results.items():
        print(f"{case:36} {value:14,.0f}")
        rows.append({"case": case, "value": round(value, 1), "unit": "images/s"})
    per_sample = results[f"per_sample_cpu/{args.workers}_workers"]
    ratios = {"on_device_vs_per_sample_cpu": round(results["on_device/cpu"] / per_sample, 2)}
    if "on_device/cuda" in results:
        ratios["on_device_cuda_vs_per_sample_cpu"] = round(results["on_device/cuda"] / per_sample, 2)
    out = write_result(
        "augment_throughput", rows, ratios, {"on_device_vs_per_sample_cpu": 10.0}, out=args.out
    )
    print(f"on_device_vs_per_sample_cpu = {ratios['on_device_vs_per_sample_cpu']:.1f}x; wrote {out}")


if __name__ == "__main__":
    main()
