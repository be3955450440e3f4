"""Cost of seeding every per-sample augmentation draw (``SeededDraws``) against the transform itself.

The per-sample CPU path fetches each training item inside ``torch.random.fork_rng`` with torch's
CPU generator seeded for that item (:mod:`lightning_tricks.datamodules.draws`), which makes the
draws independent of workers and exact on resume. This times one item, single-threaded as in a
``DataLoader`` worker, with and without the seeding, for:

* ``cifar``: a 3x32x32 uint8 tensor through ``crop_flip`` (pad 4, random crop, flip);
* ``folder``: a 500x375 JPEG decoded with PIL and put through the ImageFolder default
  (``inception`` random-resized crop to 224, ``flip``);
* ``seeding_only``: the fork, seed and restore around an item that does nothing.

Run::

    python benchmarks/seeded_draws.py           # --quick for fewer rounds

Writes ``benchmarks/results/seeded_draws.json``; ratios ``seeded_vs_plain/<case>`` are the seeded
time per item over the plain one (1.0: free). Rounds are interleaved; the median is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from lightning_tricks.datamodules.augment import PresetContext, build_transform
from lightning_tricks.datamodules.draws import SeededDraws
from lightning_tricks.datamodules.folder import ImageFileDataset
from lightning_tricks.datamodules.in_memory import TransformedTensorDataset

try:
    from _report import result_path, write_result
except ModuleNotFoundError:  # imported from outside benchmarks/, which running a script puts on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import result_path, write_result


class Nothing(Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> int:
        return index


def per_item_us(fetch: Callable[[], object], items: int) -> float:
    start = time.perf_counter()
    for _ in range(items):
        fetch()
    return (time.perf_counter() - start) / items * 1e6


def datasets(folder: Path) -> dict[str, tuple[Dataset, int]]:
    """``case -> (dataset, items per round)``."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, generator=generator)
    cifar = TransformedTensorDataset(
        images, torch.zeros(64, dtype=torch.long), build_transform(["crop_flip"], PresetContext(size=32))
    )
    pixels = np.random.default_rng(0).integers(0, 256, (375, 500, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(folder / "image.jpg", quality=90)
    presets = build_transform(["inception", "flip"], PresetContext(size=224))
    files = ImageFileDataset(
        [(str(folder / "image.jpg"), 0)], v2.Compose([v2.ToImage(), presets, v2.ToPureTensor()])
    )
    return {"cifar": (cifar, 2000), "folder": (files, 40), "seeding_only": (Nothing(), 5000)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--out", default=str(result_path("seeded_draws")))
    args = parser.parse_args()
    torch.set_num_threads(1)  # as in a DataLoader worker
    rounds = 3 if args.quick else 7

    with tempfile.TemporaryDirectory() as folder:
        cases = datasets(Path(folder))
        times: dict[str, list[float]] = {}
        for _ in range(rounds):
            for case, (dataset, items) in cases.items():
                seeded = SeededDraws(dataset)
                plain = per_item_us(lambda d=dataset: d[0], items)
                with_seed = per_item_us(lambda s=seeded: s[(0, 12345)], items)
                times.setdefault(f"plain/{case}", []).append(plain)
                times.setdefault(f"seeded/{case}", []).append(with_seed)

    medians = {case: statistics.median(values) for case, values in times.items()}
    print(f"{'case':24} {'us/item':>10}")
    rows = []
    for case, value in medians.items():
        print(f"{case:24} {value:10.1f}")
        rows.append({"case": case, "value": round(value, 2), "unit": "us/item"})
    ratios = {
        f"seeded_vs_plain/{case}": round(medians[f"seeded/{case}"] / medians[f"plain/{case}"], 3)
        for case in ("cifar", "folder")
    }
    for name, ratio in ratios.items():
        print(f"{name} = {ratio:.3f}")
    out = write_result("seeded_draws", rows, ratios, {}, out=args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
