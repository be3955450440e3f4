"""Data that cannot train a model fails in setup, naming the folder that was looked at."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from data_files import make_tree, write_cifar10

from lightning_tricks.datamodules.cifar import CIFAR10DataModule
from lightning_tricks.datamodules.folder import ImageFolderDataModule


def folder_dm(root, **kwargs) -> ImageFolderDataModule:
    defaults = dict(crop_size=32, resize_size=40, num_workers=0, batch_size=4, stats_cache=None)
    return ImageFolderDataModule(root, **{**defaults, **kwargs})


def test_training_class_folder_without_images_is_an_error(tmp_path):
    make_tree(tmp_path, per_class=2)
    (tmp_path / "train" / "empty_class").mkdir()
    (tmp_path / "val" / "empty_class").mkdir()
    (tmp_path / "train" / "empty_class" / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=r"without images.*train/.*empty_class.*no training data"):
        folder_dm(tmp_path).setup("fit")


def test_validation_class_folder_without_images_warns(tmp_path):
    make_tree(tmp_path, per_class=2)
    for image in (tmp_path / "val" / "flower").iterdir():
        image.unlink()
    dm = folder_dm(tmp_path)
    with pytest.warns(UserWarning, match=r"without images.*val/.*flower"):
        dm.setup("fit")
    assert {label for _, label in dm.samples["train"]} == {0, 1}


@pytest.fixture
def offline(monkeypatch):
    def refuse(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


def test_offline_download_of_missing_cifar_names_folder_and_what_to_put_there(tmp_path, offline):
    dm = CIFAR10DataModule(data_dir=tmp_path / "data", download=True)
    with pytest.raises(FileNotFoundError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str((tmp_path / "data" / "cifar-10-batches-py").resolve()) in message
    assert "does not exist" in message and "cifar-10-python.tar.gz" in message
    assert "network is unreachable" in message and "download=false" in message


def test_offline_download_over_corrupt_cifar_says_it_is_corrupt(tmp_path, offline):
    write_cifar10(tmp_path)  # files that fail torchvision's real checksums
    with pytest.raises(FileNotFoundError, match=r"cifar-10-batches-py exists but .*checksum.*corrupt"):
        CIFAR10DataModule(data_dir=tmp_path, download=True).prepare_data()  # what Lightning calls first
