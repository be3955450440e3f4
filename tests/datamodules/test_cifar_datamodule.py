from __future__ import annotations

import numpy as np
import pytest
import torch
from data_files import accept_checksums, write_cifar10, write_cifar100

from lightning_tricks.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule


def _as_nchw(data: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(data.reshape(-1, 3, 32, 32))


def test_cifar10_splits_shapes_labels(tmp_path, monkeypatch):
    arrays = write_cifar10(tmp_path)
    accept_checksums(monkeypatch, tmp_path)
    dm = CIFAR10DataModule(data_dir=tmp_path, download=False, val_size=0.25, batch_size=16, seed=3)
    dm.setup("fit")
    train_x, train_y = dm._splits["train"].tensors
    val_x, val_y = dm._splits["val"].tensors
    assert (len(train_y), len(val_y)) == (75, 25)
    assert train_x.dtype == torch.uint8 and train_x.shape[1:] == (3, 32, 32)
    # Train and val are a seeded partition of the original training set, labels kept with images.
    original = _as_nchw(arrays["train_data"])
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(val_x, original[perm[:25].sort().values])
    assert val_y.tolist() == [arrays["train_labels"][i] for i in perm[:25].sort().values]
    assert torch.equal(train_x, original[perm[25:].sort().values])
    # The test split is CIFAR's test batch.
    test_x, test_y = next(iter(dm.test_dataloader()))
    assert torch.equal(test_x, _as_nchw(arrays["test_data"])[:16])
    assert test_y.dtype == torch.int64 and test_y.tolist() == arrays["test_labels"][:16]
    # Normalised batches come out of the device hook as float with the training statistics.
    out, _ = dm.on_after_batch_transfer((test_x, test_y), 0)
    expected = (test_x.float() / 255 - dm.mean.view(1, 3, 1, 1)) / dm.std.view(1, 3, 1, 1)
    assert out.dtype == torch.float32 and torch.allclose(out, expected, atol=1e-5)


def test_cifar_cpu_augmentation_path_and_no_val(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    accept_checksums(monkeypatch, tmp_path)
    dm = CIFAR10DataModule(
        data_dir=tmp_path,
        download=False,
        val_size=None,
        batch_size=8,
        augment=["crop_flip", "random_erasing"],
        augment_on_device=False,
        stats_cache=None,
    )
    dm.setup("fit")
    assert "val" not in dm._splits and dm.val_dataloader() == []
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64


def test_cifar100_fine_labels(tmp_path, monkeypatch):
    arrays = write_cifar100(tmp_path)
    accept_checksums(monkeypatch, tmp_path)
    dm = CIFAR100DataModule(data_dir=tmp_path, download=False, val_size=10, batch_size=64)
    dm.setup("fit")
    assert dm.num_classes == 100 and len(dm._splits["val"]) == 10 and len(dm._splits["train"]) == 50
    test_x, test_y = dm._splits["test"].tensors
    assert torch.equal(test_x, _as_nchw(arrays["test_data"]))
    assert test_y.tolist() == arrays["test_labels"]


def test_missing_cifar_fails_with_fix(tmp_path):
    dm = CIFAR10DataModule(data_dir=tmp_path / "nowhere", download=False)
    with pytest.raises(FileNotFoundError, match=r"nowhere.*download=True.*cifar-10-batches-py"):
        dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="cifar-100-python"):
        CIFAR100DataModule(data_dir=tmp_path, download=False).setup("fit")


def test_corrupt_cifar_fails_with_fix(tmp_path):
    write_cifar10(tmp_path)  # real torchvision checksums: these files do not match them
    with pytest.raises(RuntimeError, match=r"corrupt.*download=True"):
        CIFAR10DataModule(data_dir=tmp_path, download=False).setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"val_size": 1.5}, "val_size"),
        ({"val_size": -1}, "val_size"),
        ({"augment": ["crop_flip", "autoaugment"]}, "augment_on_device=False"),
        ({"augment": "sharpen"}, "valid presets"),
        ({"batch_augment": "mixop"}, "mixup"),
        ({"pad_mode": "wrap"}, "pad_mode"),
        ({"whitening": "pcb"}, "whitening"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_fail_early(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        CIFAR10DataModule(data_dir=tmp_path, **kwargs)


def test_val_size_too_large(tmp_path, monkeypatch):
    write_cifar10(tmp_path)
    accept_checksums(monkeypatch, tmp_path)
    with pytest.raises(ValueError, match="leaves no training images"):
        CIFAR10DataModule(data_dir=tmp_path, download=False, val_size=100).setup("fit")
