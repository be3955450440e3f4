from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_sample_images
from torch.nn import functional as F

from lightning_tricks.datamodules.augment import (
    PRESETS,
    BatchAugment,
    PCALighting,
    PresetContext,
    build_transform,
)
from lightning_tricks.datamodules.base import InMemoryImageDataModule
from lightning_tricks.datamodules.stats import ImageStatistics


@pytest.fixture(scope="module")
def stats():
    images = torch.randint(
        0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    return ImageStatistics().fit(images)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_keeps_shape_and_dtype_contract(name, stats):
    torch.manual_seed(0)
    size = 24 if name in ("resnet_scale", "inception") else 32
    kwargs = {"resnet_scale": {"min_size": 26, "max_size": 40}}.get(name)
    transform = build_transform(
        name, PresetContext(size=size, stats=stats), {name: kwargs} if kwargs else None
    )
    image = torch.randint(0, 256, (3, 40, 48) if size == 24 else (3, 32, 32), dtype=torch.uint8)
    out = transform(image)
    assert out.shape == (3, size, size)
    float_presets = ("noise", "pca_lighting")
    assert out.dtype == (torch.float32 if name in float_presets else torch.uint8)
    if name == "noise":
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_unknown_names_and_kwargs_fail_with_valid_list():
    with pytest.raises(ValueError, match=r"unknown augmentation preset\(s\) \['cutout'\].*random_erasing"):
        build_transform(["crop_flip", "cutout"], PresetContext(size=32))
    with pytest.raises(ValueError, match="not selected"):
        build_transform(["flip"], PresetContext(size=32), {"crop_flip": {"pad": 2}})
    with pytest.raises(ValueError, match="bad augment_kwargs for preset 'flip'"):
        build_transform(["flip"], PresetContext(size=32), {"flip": {"prob": 0.1}})
    with pytest.raises(ValueError, match="pca_lighting needs the training statistics"):
        build_transform(["pca_lighting"], PresetContext(size=32))
    with pytest.raises(ValueError, match=r"valid are \['mixup', 'cutmix'\]"):
        BatchAugment(["mixup", "cutout"], num_classes=10)


def test_pca_lighting_shift_lies_along_scaled_eigenvectors(stats):
    images = torch.rand(5, 3, 8, 8)
    lighting = PCALighting(stats, std=0.1)
    torch.manual_seed(7)
    out = lighting(images)
    torch.manual_seed(7)
    alpha = torch.randn(5, 3) * 0.1
    shift = out - images
    # Every pixel of an image moves by the same colour vector ...
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift), atol=1e-6)
    # ... whose coordinates in the eigenbasis are alpha_i * lambda_i.
    coords = shift[:, :, 0, 0] @ stats.eigvec  # eigvec is orthonormal
    assert torch.allclose(coords, alpha * stats.eigval, atol=1e-6)


IMAGENET_TOP_EIGVAL = 0.2175  # fb.resnet.torch's ImageNet colour PCA (0.2175, 0.0188, 0.0045), std 0.1


def test_pca_lighting_eigenvalues_and_shift_are_in_unit_pixel_units_as_the_imagenet_constants():
    """Units: the eigenvalues are variances of pixels in [0, 1] and the shift is added to [0, 1]
    images before normalisation, the units of the ImageNet constants that PyTorch ports use with
    ``std=0.1``. On real photos that moves pixels by a few of 255 levels, whatever the storage dtype;
    eigenvalues in 0-255 units (65,025 times larger) would move them by thousands."""
    photos = np.stack(load_sample_images().images)[:, ::8, ::8]  # scikit-learn's 2 photos, uint8 NHWC
    images = torch.from_numpy(photos.copy()).permute(0, 3, 1, 2).contiguous()
    stats = ImageStatistics().fit(images)
    pixels = photos.reshape(-1, 3) / 255.0
    expected = np.linalg.eigvalsh(np.cov(pixels, rowvar=False, bias=True))[::-1]
    np.testing.assert_allclose(stats.eigval.numpy(), expected, rtol=1e-4)
    # The ImageNet constants' scale and shape: about 90 % of the variance along the first component.
    assert IMAGENET_TOP_EIGVAL / 2 < expected[0] < IMAGENET_TOP_EIGVAL * 2
    assert expected[0] / expected.sum() > 0.8
    lighting = PCALighting(stats, std=0.1)
    torch.manual_seed(0)
    from_uint8 = lighting(images)
    torch.manual_seed(0)
    torch.testing.assert_close(from_uint8, lighting(images.float() / 255))
    shifts = lighting(torch.zeros(4000, 3, 1, 1)).flatten(1)
    rms = shifts.pow(2).sum(1).mean().sqrt().item()  # E|shift|^2 = std^2 * sum(lambda_i^2)
    assert rms == pytest.approx(0.1 * np.sqrt((expected**2).sum()), rel=0.05)
    assert 2 / 255 < rms < 16 / 255


def test_mixup_targets_match_the_mixing():
    torch.manual_seed(0)
    images = torch.rand(8, 3, 16, 16)
    labels = torch.arange(8) % 4
    mixed, targets = BatchAugment("mixup", num_classes=4, mixup_alpha=0.4)(images, labels)
    assert targets.shape == (8, 4) and targets.dtype == torch.float32
    assert torch.allclose(targets.sum(1), torch.ones(8))
    # v2.MixUp pairs each sample with the previous one (roll by 1) with one lambda per batch.
    lam = targets[0, labels[0]].item()
    one_hot = F.one_hot(labels, 4).float()
    assert torch.allclose(targets, lam * one_hot + (1 - lam) * one_hot.roll(1, 0), atol=1e-6)
    assert torch.allclose(mixed, lam * images + (1 - lam) * images.roll(1, 0), atol=1e-6)


def test_cutmix_targets_equal_pasted_area():
    torch.manual_seed(3)
    images = torch.zeros(6, 1, 20, 20) + torch.arange(6.0).view(6, 1, 1, 1)  # image i is constant i
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    for _ in range(5):
        mixed, targets = BatchAugment("cutmix", num_classes=3)(images, labels)
        assert torch.allclose(targets.sum(1), torch.ones(6))
        kept = (mixed == images).float().mean(dim=(1, 2, 3))  # fraction of own pixels
        one_hot = F.one_hot(labels, 3).float()
        expected = kept[:, None] * one_hot + (1 - kept[:, None]) * one_hot.roll(1, 0)
        assert torch.allclose(targets, expected, atol=1e-6)


class TinyData(InMemoryImageDataModule):
    num_classes, in_channels, image_size = 10, 3, 8

    def load_splits(self):
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8, generator=generator)
        return {"train": (images, torch.arange(32) % 10)}


def test_datamodule_batch_hook_mixes_only_training_batches():
    dm = TinyData(batch_size=32, augment="crop_flip", batch_augment=["mixup", "cutmix"])
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))

    class _State:
        training = True

    dm.trainer = _State()
    _, targets = dm.on_after_batch_transfer(batch, 0)
    assert targets.shape == (32, 10) and torch.allclose(targets.sum(1), torch.ones(32))
    dm.trainer.training = False
    _, eval_targets = dm.on_after_batch_transfer(batch, 0)
    assert torch.equal(eval_targets, batch[1])
