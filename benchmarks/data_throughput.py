"""End-to-end data throughput (images/s) that ``train_dataloader()`` + ``on_after_batch_transfer`` deliver.

The same :class:`~lightning_tricks.datamodules.SyntheticDataModule` (CIFAR-shaped uint8 images,
the CIFAR standard augmentation ``crop_flip``: pad 4, random 32x32 crop, horizontal flip, then
normalisation) served three ways, each timed over whole epochs exactly as a Lightning training
loop consumes them (iterate the loader, move the batch to the device, call the DataModule's
``on_after_batch_transfer``):

* ``per_sample``: ``augment_on_device=False``, torchvision ``transforms.v2`` per sample in a
  ``DataLoader`` (``--workers`` processes), then batch normalisation.
* ``batched``: the default, one gather per batch (``TensorBatchLoader``) and the vectorised
  crop/flip in ``on_after_batch_transfer``, on the CPU, or on the GPU when CUDA is present.
* ``device_resident`` (CUDA only): as ``batched`` with ``data_on_device=True``: the whole split
  lives on the GPU, no host-to-device copy per batch.

The cases are interleaved (A, B, C, A, B, C, ...) for ``--repeats`` rounds, so a change in machine
load hits all of them alike; the table gives the median and the min-max range, the ratios are
medians of the per-round ratios. The 1-minute load average before and after is recorded.

Run::

    python benchmarks/data_throughput.py            # --quick for a short run

Writes ``benchmarks/results/data_throughput.json``; ``batched_vs_per_sample`` is the batched
median images/s divided by the per-sample median images/s (target >= 10).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import lightning as L
import torch

from lightning_tricks.datamodules import SyntheticDataModule

try:
    from _report import result_path, write_result
except ModuleNotFoundError:  # imported from outside benchmarks/, which running a script puts on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import result_path, write_result

BATCH = 512


def build(case: str, num_train: int, workers: int, accelerator: str) -> SyntheticDataModule:
    """A set-up DataModule attached to a (never fitted) Trainer in its training stage."""
    dm = SyntheticDataModule(
        num_train=num_train,
        num_val=0,
        num_test=0,
        image_size=32,
        in_channels=3,
        batch_size=BATCH,
        augment="crop_flip",
        augment_on_device=case != "per_sample",
        data_on_device=case == "device_resident",
        num_workers=workers if case == "per_sample" else 0,
    )
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False)
    trainer.training = True
    dm.trainer = trainer
    dm.setup("fit")
    return dm


def epoch_images_per_second(dm: SyntheticDataModule, device: torch.device) -> float:
    """One epoch through the loader, the device copy and ``on_after_batch_transfer``."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    seen = 0
    for images, labels in dm.train_dataloader():
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        images, labels = dm.on_after_batch_transfer((images, labels), 0)
        seen += len(labels)
    if cuda:
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    parser.add_argument("--workers", type=int, default=min(2, len(os.sched_getaffinity(0))))
    parser.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads of the main process"
    )
    parser.add_argument(
        "--num-train",
        type=int,
        default=None,
        help=f"images per epoch (default {BATCH * 16}, quick {BATCH * 8})",
    )
    parser.add_argument("--out", default=str(result_path("data_throughput")))
    args = parser.parse_args()
    if args.num_train is not None and args.num_train < 1:
        parser.error(f"--num-train must be >= 1, got {args.num_train}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    num_train = args.num_train or BATCH * (8 if args.quick else 16)

    cuda = torch.cuda.is_available()
    accelerator = "cuda" if cuda else "cpu"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    cases = ["per_sample", "batched"] + (["device_resident"] if cuda else [])
    modules = {case: build(case, num_train, args.workers, accelerator) for case in cases}
    load_before = os.getloadavg()[0]
    for case in cases:  # warm-up epoch: worker start-up, allocator, kernels
        epoch_images_per_second(modules[case], device)
    samples: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(repeats):
        for case in cases:
            samples[case].append(epoch_images_per_second(modules[case], device))
    load_after = os.getloadavg()[0]

    suffix = f"/{accelerator}" if accelerator == "cuda" else "/cpu"
    names = {case: f"{case}{'' if case == 'per_sample' else suffix}" for case in cases}
    names["per_sample"] = f"per_sample/{args.workers}_workers"
    print(f"{'case':28} {'median images/s':>16} {'min':>12} {'max':>12}")
    rows = []
    for case in cases:
        values = samples[case]
        median = statistics.median(values)
        print(f"{names[case]:28} {median:16,.0f} {min(values):12,.0f} {max(values):12,.0f}")
        rows.append({"case": names[case], "value": round(median, 1), "unit": "images/s"})
        rows.append({"case": f"{names[case]}/min", "value": round(min(values), 1), "unit": "images/s"})
        rows.append({"case": f"{names[case]}/max", "value": round(max(values), 1), "unit": "images/s"})
    rows.append({"case": "load_average_1min/before", "value": round(load_before, 2), "unit": "load"})
    rows.append({"case": "load_average_1min/after", "value": round(load_after, 2), "unit": "load"})

    ratios = {}
    for case in cases[1:]:
        per_round = [b / a for a, b in zip(samples["per_sample"], samples[case], strict=True)]
        key = f"{case}_vs_per_sample"
        ratios[key] = round(statistics.median(per_round), 2)
        ratios[f"{key}/min"] = round(min(per_round), 2)
        ratios[f"{key}/max"] = round(max(per_round), 2)
    out = write_result("data_throughput", rows, ratios, {"batched_vs_per_sample": 10.0}, out=args.out)
    print(
        f"batched_vs_per_sample = {ratios['batched_vs_per_sample']:.1f}x "
        f"(rounds {ratios['batched_vs_per_sample/min']:.1f}-{ratios['batched_vs_per_sample/max']:.1f}x), "
        f"{repeats} interleaved rounds of {num_train} images, load {load_before:.1f} -> {load_after:.1f}; "
        f"wrote {out}"
    )


if __name__ == "__main__":
    main()
