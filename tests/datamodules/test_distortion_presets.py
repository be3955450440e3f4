"""JPEG, elastic, lens distortion, salt-and-pepper and AugMix presets against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms import v2

from lightning_tricks.datamodules import DigitsDataModule, InMemoryImageDataModule
from lightning_tricks.datamodules.augment import (
    AugMixViews,
    PresetContext,
    build_augmix_views,
    build_transform,
)
from lightning_tricks.datamodules.distortions import lens_distort, salt_and_pepper
from lightning_tricks.datamodules.on_device import OnDeviceAugment


def _random_uint8(shape, seed=0, low=0, high=256):
    return torch.randint(low, high, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_jpeg_preset_equals_an_encode_decode_round_trip_at_the_drawn_quality():
    image = _random_uint8((3, 24, 24))
    out = build_transform("jpeg", PresetContext(size=24), {"jpeg": {"quality": [40, 40]}})(image)
    assert torch.equal(out, decode_jpeg(encode_jpeg(image, quality=40)))
    # Float images in [0, 1] are quantised to uint8 first, as torchvision's ToDtype does.
    as_float = image.float() / 255
    out = build_transform("jpeg", PresetContext(size=24), {"jpeg": {"quality": 90}})(as_float)
    assert out.dtype == torch.uint8
    assert torch.equal(out, decode_jpeg(encode_jpeg((as_float * 255).round().to(torch.uint8), quality=90)))


def test_jpeg_quality_range_is_drawn_per_image():
    image = _random_uint8((3, 32, 32), seed=1)
    references = {q: decode_jpeg(encode_jpeg(image, quality=q)) for q in range(60, 63)}
    transform = build_transform("jpeg", PresetContext(size=32), {"jpeg": {"quality": [60, 62]}})
    torch.manual_seed(0)
    seen = set()
    for _ in range(30):
        out = transform(image)
        seen |= {q for q, reference in references.items() if torch.equal(out, reference)}
    assert seen == {60, 61, 62}


def test_elastic_preset_is_torchvision_elastic_transform():
    image = _random_uint8((1, 16, 16))
    preset = build_transform("elastic", PresetContext(size=16), {"elastic": {"alpha": 6.0, "sigma": 1.5}})
    torch.manual_seed(5)
    out = preset(image)
    torch.manual_seed(5)
    assert torch.equal(out, v2.ElasticTransform(alpha=6.0, sigma=1.5)(image))
    assert not torch.equal(out, image)
    still = build_transform("elastic", PresetContext(size=16), {"elastic": {"alpha": 0.0, "sigma": 1.0}})
    assert torch.equal(still(image), image)  # zero displacement


def _scipy_lens(image: np.ndarray, k: float, mode: str) -> np.ndarray:
    """Radial map written out: output pixel centre p (normalised, align_corners=False) samples the
    source at p * (1 + k * |p|^2 / 2), bilinearly (order=1) with SciPy."""
    _, height, width = image.shape
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    y, x = (2 * rows + 1) / height - 1, (2 * cols + 1) / width - 1
    factor = 1 + k * (x**2 + y**2) / 2
    src_rows = ((y * factor) + 1) * height / 2 - 0.5
    src_cols = ((x * factor) + 1) * width / 2 - 0.5
    return np.stack(
        [
            ndimage.map_coordinates(c, [src_rows, src_cols], order=1, mode=mode)
            for c in image.astype(np.float64)
        ]
    )


@pytest.mark.parametrize(
    ("padding_mode", "scipy_mode"), [("zeros", "grid-constant"), ("reflection", "reflect")]
)
@pytest.mark.parametrize("k", [0.3, -0.25])
def test_lens_distortion_matches_the_radial_map_resampled_by_scipy(padding_mode, scipy_mode, k):
    image = torch.rand(2, 12, 10, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = lens_distort(image.float(), torch.tensor(k), padding_mode)
    expected = _scipy_lens(image.numpy(), k, scipy_mode)
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-5)


def test_lens_distortion_batched_equals_per_image_and_k_zero_is_identity():
    images = _random_uint8((4, 3, 9, 9))
    k = torch.tensor([0.0, 0.2, -0.2, 0.5])
    batched = lens_distort(images, k)
    assert batched.dtype == torch.uint8
    for i in range(4):
        assert torch.equal(batched[i], lens_distort(images[i], k[i]))
    assert torch.equal(batched[0], images[0])
    barrel = lens_distort(torch.ones(1, 1, 9, 9), torch.tensor([0.5]), "zeros")
    assert barrel[0, 0, 4, 4] == 1 and barrel[0, 0, 0, 0] < 1  # corners sample outside the image


def test_salt_and_pepper_replaces_the_requested_fraction_with_black_and_white():
    images = _random_uint8((64, 3, 32, 32), low=1, high=255)  # neither black nor white before
    torch.manual_seed(0)
    out = salt_and_pepper(images, fraction=0.1, salt=0.3)
    changed = (out != images).any(dim=1)  # (N, H, W) pixels
    white = (out == 255).all(dim=1)
    black = (out == 0).all(dim=1)
    assert torch.equal(changed, white | black)  # a replaced pixel has all its channels replaced
    pixels = changed.numel()
    # Binomial(pixels, p): within 5 standard deviations.
    for observed, p in (
        (changed.float().mean(), 0.1),
        (white.float().mean(), 0.03),
        (black.float().mean(), 0.07),
    ):
        assert abs(observed.item() - p) < 5 * (p * (1 - p) / pixels) ** 0.5
    floats = salt_and_pepper(torch.full((2, 1, 8, 8), 0.5), fraction=1.0, salt=1.0)
    assert torch.equal(floats, torch.ones(2, 1, 8, 8))  # white of a float image is 1.0


class RandomPixels(InMemoryImageDataModule):
    num_classes, in_channels, image_size = 4, 3, 16

    def load_splits(self):
        return {"train": (_random_uint8((256, 3, 16, 16), low=1, high=255), torch.arange(256) % 4)}


def _replaced_fraction(batches) -> float:
    replaced = [((x == 0) | (x == 255)).all(dim=1).float() for x in batches]
    return torch.cat([r.flatten() for r in replaced]).mean().item()


def test_salt_pepper_has_the_same_distribution_on_the_device_and_per_sample_paths():
    options = {
        "augment": ["salt_pepper"],
        "augment_kwargs": {"salt_pepper": {"fraction": 0.2}},
        "batch_size": 64,
    }
    torch.manual_seed(0)
    on_device = RandomPixels(**options)
    on_device.setup("fit")
    device_batches = [on_device.augment_batch(x, y)[0] for x, y in on_device.train_dataloader()]
    per_sample = RandomPixels(augment_on_device=False, **options)
    per_sample.setup("fit")
    sample_batches = [x for x, _ in per_sample.train_dataloader()]
    pixels = 256 * 16 * 16
    tolerance = 5 * (0.2 * 0.8 / pixels) ** 0.5
    assert abs(_replaced_fraction(device_batches) - 0.2) < tolerance
    assert abs(_replaced_fraction(sample_batches) - 0.2) < tolerance
    assert device_batches[0].dtype == sample_batches[0].dtype == torch.uint8


def test_lens_distortion_has_the_same_distribution_on_the_device_and_per_sample_paths():
    # Mean absolute change of a pixel: a function of the per-image k ~ U[0.1, 0.3] on both paths.
    options = {"augment": ["lens_distortion"], "augment_kwargs": {"lens_distortion": {"k": [0.1, 0.3]}}}
    torch.manual_seed(0)
    on_device = RandomPixels(batch_size=256, **options)
    on_device.setup("fit")
    original, labels = next(iter(on_device.train_dataloader()))
    device_change = (on_device.augment_batch(original, labels)[0].float() - original.float()).abs().mean()
    per_sample = RandomPixels(batch_size=256, augment_on_device=False, **options)
    per_sample.setup("fit")
    images = per_sample._split("train").tensors[0]
    transform = per_sample.train_transform()
    sample_change = torch.stack([(transform(x).float() - x.float()).abs().mean() for x in images]).mean()
    unchanged = (lens_distort(images, torch.zeros(256)).float() - images.float()).abs().mean()
    assert unchanged == 0 and device_change > 10  # k in [0.1, 0.3] moves pixels noticeably
    assert abs(device_change - sample_change) < 0.05 * sample_change


def test_on_device_lens_distortion_draws_k_uniformly_per_image():
    augment = OnDeviceAugment(["lens_distortion"], options={"lens_distortion": {"k": [0.1, 0.3]}})
    images = torch.rand(6, 1, 11, 11)
    generator = torch.Generator().manual_seed(4)
    out = augment(images, generator)
    k = torch.rand(6, generator=torch.Generator().manual_seed(4)) * 0.2 + 0.1
    assert torch.allclose(out, lens_distort(images, k), atol=1e-6)


def test_augmix_preset_is_torchvision_augmix():
    image = _random_uint8((3, 16, 16))
    preset = build_transform("augmix", PresetContext(size=16), {"augmix": {"severity": 2}})
    torch.manual_seed(1)
    out = preset(image)
    torch.manual_seed(1)
    assert torch.equal(out, v2.AugMix(severity=2)(image))


def test_augmix_views_share_the_base_draw_and_differ_in_the_augmix_draws():
    views = build_augmix_views(["flip", "augmix"], PresetContext(size=16), {"flip": {"p": 1.0}})
    assert isinstance(views, AugMixViews)
    image = _random_uint8((3, 16, 16))
    torch.manual_seed(0)
    clean, first, second = views(image)
    assert torch.equal(clean, image.flip(-1))
    assert not torch.equal(first, second) and not torch.equal(first, clean)


def test_datamodule_yields_clean_and_two_augmix_views_in_timm_layout():
    dm = DigitsDataModule(
        image_size=16, augment=["flip", "augmix"], augment_on_device=False, augmix_jsd=True, batch_size=8
    )
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (8, 3, 1, 16, 16)

    class _Trainer:
        training, current_epoch = True, 0

    dm.trainer = _Trainer()
    flat, targets = dm.on_after_batch_transfer((images, labels), 0)
    assert flat.shape == (24, 1, 16, 16) and torch.equal(targets, labels.repeat(3))
    assert torch.equal(flat[:8], dm.normalize_images(images[:, 0]))  # clean views first
    assert torch.equal(flat[8:16], dm.normalize_images(images[:, 1]))
    dm.trainer.training = False  # a before-training check drawing training batches gets the same layout
    assert dm.on_after_batch_transfer((images, labels), 0)[0].shape == (24, 1, 16, 16)


@pytest.mark.parametrize(
    ("kwargs", "needles"),
    [
        (
            {"augment": "jpeg", "augment_kwargs": {"jpeg": {"quality": 0}}},
            ["augment_kwargs.jpeg.quality=0", "1 <= low <= high <= 100", "e.g."],
        ),
        ({"augment": "jpeg", "augment_kwargs": {"jpeg": {"quality": [50]}}}, ["quality=[50]", "[low, high]"]),
        (
            {"augment": "jpeg", "augment_kwargs": {"jpeg": {"quality": [90, 101]}}},
            ["quality=[90, 101]", "1 <= low <= high <= 100"],
        ),
        (
            {"augment": "salt_pepper", "augment_kwargs": {"salt_pepper": {"fraction": -0.1}}},
            ["augment_kwargs.salt_pepper.fraction=-0.1", "[0, 1]", "e.g."],
        ),
        (
            {"augment": "lens_distortion", "augment_kwargs": {"lens_distortion": {"k": [-0.5, 0.1]}}},
            ["lens_distortion.k=[-0.5, 0.1]", "-0.333"],
        ),
        ({"augment": ["crop_flip", "pixel_flip"]}, ["augment", "'pixel_flip'", "salt_pepper", "fix"]),
        (
            {"augment": "elastic", "augment_kwargs": {"elastic": {"sigma": 0}}},
            ["augment_kwargs.elastic", "sigma > 0"],
        ),
        (
            {"augment": "augmix", "augment_kwargs": {"augmix": {"severity": 11}}},
            ["augment_kwargs.augmix", "severity=11", "[1, 10]"],
        ),
        (
            {"augment": ["augmix", "flip"], "augmix_jsd": True},
            ["augmix_jsd", "last preset", "augment=['augmix', 'flip']"],
        ),
        (
            {"augment": "augmix", "augmix_jsd": True, "batch_augment": "mixup"},
            ["augmix_jsd", "batch_augment=['mixup']"],
        ),
        ({"aug_repeats": 0}, ["aug_repeats=0", ">= 1", "e.g."]),
        ({"mixup_off_epoch": 3}, ["mixup_off_epoch=3", "batch_augment"]),
        ({"mixup_off_epoch": 0, "batch_augment": "mixup"}, ["mixup_off_epoch=0", ">= 1"]),
    ],
)
def test_bad_options_fail_at_construction_naming_key_value_range_and_fix(kwargs, needles):
    with pytest.raises(ValueError) as info:
        DigitsDataModule(augment_on_device=False, **kwargs)
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} missing from: {info.value}"


def test_on_device_presets_check_their_options_at_construction_too():
    with pytest.raises(ValueError, match=r"augment_kwargs.salt_pepper.fraction=1.5 is out of range"):
        DigitsDataModule(augment="salt_pepper", augment_kwargs={"salt_pepper": {"fraction": 1.5}})
    with pytest.raises(ValueError, match=r"bad augment_kwargs for preset 'lens_distortion'"):
        DigitsDataModule(augment="lens_distortion", augment_kwargs={"lens_distortion": {"strength": 0.1}})


def test_elastic_sigma_too_large_for_the_images_fails_at_setup_with_a_fitting_value():
    dm = DigitsDataModule(augment="elastic", augment_on_device=False)  # 8x8 digits, torchvision's sigma=5
    with pytest.raises(ValueError, match=r"elastic.sigma=5.0 is too large for 8x8 images"):
        dm.setup("fit")
