"""Small datasets in real on-disk formats: CIFAR-10/100 pickles and ImageNet-style JPEG folders."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.datasets import CIFAR10, CIFAR100


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _write(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def write_cifar10(root: Path, per_batch: int = 20, n_test: int = 30, seed: int = 0) -> dict:
    """Five training batches, a test batch and the meta file; returns the arrays written."""
    rng = np.random.default_rng(seed)
    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    arrays = {"train_data": [], "train_labels": []}
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, per_batch).tolist()
        _write(folder / f"data_batch_{i}", {"data": data, "labels": labels})
        arrays["train_data"].append(data)
        arrays["train_labels"] += labels
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = rng.integers(0, 10, n_test).tolist()
    _write(folder / "test_batch", {"data": test, "labels": test_labels})
    _write(folder / "batches.meta", {"label_names": [f"class{i}" for i in range(10)]})
    arrays["train_data"] = np.concatenate(arrays["train_data"])
    arrays.update(test_data=test, test_labels=test_labels)
    return arrays


def write_cifar100(root: Path, n_train: int = 60, n_test: int = 20, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder = root / CIFAR100.base_folder
    folder.mkdir(parents=True)
    arrays = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 100, n).tolist()
        _write(folder / name, {"data": data, "fine_labels": labels, "coarse_labels": [0] * n})
        arrays[f"{name}_data"], arrays[f"{name}_labels"] = data, labels
    _write(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)]})
    return arrays


def accept_checksums(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """Point torchvision's md5 lists at the files written here (its integrity check stays on)."""
    for cls in (CIFAR10, CIFAR100):
        folder = root / cls.base_folder
        if not folder.is_dir():
            continue
        for attr in ("train_list", "test_list"):
            entries = [[name, _md5(folder / name)] for name, _ in getattr(cls, attr)]
            monkeypatch.setattr(cls, attr, entries)
        meta = dict(cls.meta, md5=_md5(folder / cls.meta["filename"]))
        monkeypatch.setattr(cls, "meta", meta)


CLASSES = ("china", "flower")


def make_tree(root: Path, per_class: int = 3, splits=("train", "val")) -> dict[str, list[Path]]:
    """Real JPEG crops of scikit-learn's two sample photos, one class per photo."""
    photos = load_sample_images().images
    files: dict[str, list[Path]] = {}
    for split in splits:
        files[split] = []
        for label, (name, photo) in enumerate(zip(CLASSES, photos, strict=True)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                top, left = 20 * i + 5 * label, 30 * i
                crop = photo[top : top + 72 + 8 * i, left : left + 96]
                path = folder / f"{split}_{i}.jpg"
                Image.fromarray(crop).save(path, quality=90)
                files[split].append(path)
    return files
