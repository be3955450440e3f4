from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from data_files import CLASSES, make_tree
from PIL import Image
from torchvision.transforms import v2

from lightning_tricks.datamodules.folder import ImageFolderDataModule
from lightning_tricks.datamodules.stats import ImageStatistics


def small_dm(root: Path, **kwargs) -> ImageFolderDataModule:
    defaults = dict(crop_size=32, resize_size=40, num_workers=0, batch_size=4, stats_cache=None)
    return ImageFolderDataModule(root, **{**defaults, **kwargs})


def test_loaders_and_statistics_match_numpy(tmp_path):
    files = make_tree(tmp_path)
    dm = small_dm(
        tmp_path,
        augment=["resnet_scale", "color_jitter"],
        augment_kwargs={"resnet_scale": {"min_size": 36, "max_size": 48}},
    )
    dm.setup("fit")
    assert dm.classes == list(CLASSES) and dm.num_classes == 2
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.uint8 and labels.dtype == torch.int64
    val_images, val_labels = next(iter(dm.val_dataloader()))
    assert val_images.shape == (4, 3, 32, 32) and val_labels.tolist() == [0, 0, 0, 1]
    # val doubles as test when there is no test/ folder.
    assert dm.samples["test"] == dm.samples["val"]
    # Statistics: NumPy on the same eval-transformed training images (all 6 < stats_samples).
    eval_t = v2.Compose([v2.Resize(40, antialias=True), v2.CenterCrop(32)])
    arrays = [
        eval_t(torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1)).numpy() / 255.0
        for p in sorted(files["train"])
    ]
    stack = np.stack(arrays).astype(np.float64)
    np.testing.assert_allclose(dm.mean.numpy(), stack.mean(axis=(0, 2, 3)), atol=1e-5)
    np.testing.assert_allclose(dm.std.numpy(), stack.std(axis=(0, 2, 3)), atol=1e-5)


def test_corrupt_image_skipped_or_raised(tmp_path):
    make_tree(tmp_path)
    bad = tmp_path / "train" / "flower" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    dm = small_dm(tmp_path, on_corrupt="skip")
    with pytest.warns(UserWarning, match=r"Skipping 1 unreadable image\(s\) in train/: .*broken\.jpg"):
        dm.setup("fit")
    assert dm.skipped == [str(bad)] and len(dm.samples["train"]) == 6
    with pytest.raises(ValueError, match=r"1 unreadable image\(s\) in train/: .*broken\.jpg"):
        small_dm(tmp_path, on_corrupt="raise").setup("fit")


def test_layout_errors_fail_early(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        small_dm(tmp_path / "missing").setup("fit")
    make_tree(tmp_path, splits=("train",))
    with pytest.raises(FileNotFoundError, match=r"missing val/ folder"):
        small_dm(tmp_path).setup("fit")
    (tmp_path / "val" / "china").mkdir(parents=True)
    (tmp_path / "val" / "dog").mkdir()
    with pytest.raises(ValueError, match=r"only in train: \['flower'\], only in val: \['dog'\]"):
        small_dm(tmp_path).setup("fit")
    shutil.rmtree(tmp_path / "val" / "dog")
    (tmp_path / "val" / "flower").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images .* of .*val"):
        small_dm(tmp_path).setup("fit")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="class folder"):
        small_dm(empty).setup("fit")
    shutil.rmtree(tmp_path / "train" / CLASSES[1])
    one_class = rf"one class folder in train/ \({CLASSES[0]}\).* at least 2 classes"
    with pytest.raises(ValueError, match=one_class):
        small_dm(tmp_path).setup("fit")
    with pytest.raises(ValueError, match="on_corrupt"):
        small_dm(tmp_path, on_corrupt="ignore")
    with pytest.raises(ValueError, match="resize_size"):
        small_dm(tmp_path, resize_size=16)


def test_test_folder_and_uncropped_test_images(tmp_path):
    make_tree(tmp_path, per_class=2, splits=("train", "val", "test"))
    dm = small_dm(tmp_path, test_center_crop=False, augment=None)
    dm.setup("test")
    assert all("test_" in path for path, _ in dm.samples["test"])
    images, _ = next(iter(dm.test_dataloader()))
    assert images.shape[-2:] == (40, 40)  # resize_size squares, larger than crop_size for TTA


def test_statistics_cache_reused(tmp_path, monkeypatch):
    make_tree(tmp_path)
    calls = []
    fit_stream = ImageStatistics.fit_stream

    def counting(self, *args, **kwargs):
        calls.append(1)
        return fit_stream(self, *args, **kwargs)

    monkeypatch.setattr(ImageStatistics, "fit_stream", counting)
    first = small_dm(tmp_path, stats_cache="data_dir")
    first.setup("fit")
    second = small_dm(tmp_path, stats_cache="data_dir")
    second.setup("fit")
    assert len(calls) == 1 and len(list(tmp_path.glob("lightning_tricks_stats_*.pt"))) == 1
    assert torch.equal(first.mean, second.mean) and torch.equal(first.stats.eigvec, second.stats.eigvec)
    small_dm(tmp_path, stats_cache="data_dir", stats_samples=3).setup("fit")  # another sample: refit
    assert len(calls) == 2


def test_folder_data_gets_the_new_presets_augmix_views_and_repeats_per_sample(tmp_path):
    make_tree(tmp_path)
    dm = small_dm(
        tmp_path,
        augment=["inception", "jpeg", "elastic", "lens_distortion", "salt_pepper", "augmix"],
        augment_kwargs={"elastic": {"alpha": 8.0, "sigma": 2.0}, "salt_pepper": {"fraction": 0.05}},
        augmix_jsd=True,
        aug_repeats=2,
        batch_size=6,
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader.sampler) == 12  # 6 training images, each twice per epoch
    images, labels = next(iter(loader))
    assert images.shape == (6, 3, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(labels[0::2], labels[1::2])  # the copies of an image are neighbours
    # Each copy has its own crop; the two AugMix views of a copy have their own AugMix draws.
    assert not torch.equal(images[0, 0], images[1, 0])
    assert not torch.equal(images[0, 1], images[0, 2])
    with pytest.raises(ValueError, match=r"elastic.sigma=5.0 is too large for 8x8 images"):
        small_dm(tmp_path, augment="elastic", crop_size=8, resize_size=8).setup("fit")
