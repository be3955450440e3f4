"""Test-time views: dense evaluation, 5 scales x 10 crops and colour-PCA variations, each against a
mean over views computed here by hand, and their metrics beside the plain test accuracy."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_tricks.datamodules.stats import ImageStatistics
from lightning_tricks.recipes import ImageClassifier
from lightning_tricks.recipes.tta import color_pca_shifts, tta_probabilities


def window_net() -> nn.Module:
    """3x3 valid conv -> ReLU -> global average pool -> linear: on a 3x3 input the feature map is 1x1."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)
    ).eval()


def mean_probs(model, views) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([model(v).softmax(-1) for v in views]).mean(0)


def test_dense_is_the_network_slid_over_every_window_with_its_probabilities_averaged():
    net = window_net()
    images = torch.randn(2, 3, 7, 9)
    # The network applied separately to every 3x3 window (its receptive field) of the image and of
    # its mirror: what dense evaluation computes in one fully convolutional pass.
    windows = [
        img[..., i : i + 3, j : j + 3]
        for img in (images, images.flip(-1))
        for i in range(5)
        for j in range(7)
    ]
    expected = mean_probs(net, windows)
    with torch.no_grad():
        dense = tta_probabilities(net, images, "dense")
        plain = net(images).softmax(-1)
    torch.testing.assert_close(dense, expected)
    assert not torch.allclose(dense, plain, atol=1e-3)  # not the pooled network's own output


@pytest.mark.parametrize(
    ("model", "kwargs"), [("mlp", {"input_size": 8}), ("airbench", {"widths": [8, 8, 8]})]
)
def test_dense_refuses_networks_without_global_average_pooling(model, kwargs):
    with pytest.raises(ValueError, match=r"tta='dense' needs .*AdaptiveAvgPool2d\(1\).*use another tta mode"):
        ImageClassifier(model, num_classes=10, in_channels=3, model_kwargs=kwargs, tta=["hflip", "dense"])


def reference_ten_crop(images: torch.Tensor, crop: int) -> list[torch.Tensor]:
    views = []
    for img in (images, images.flip(-1)):
        h, w = img.shape[-2:]
        for top, left in ((0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop)):
            views.append(img[..., top : top + crop, left : left + crop])
        top, left = round((h - crop) / 2), round((w - crop) / 2)
        views.append(img[..., top : top + crop, left : left + crop])
    return views


def test_five_scales_by_ten_crops_is_the_mean_over_fifty_views():
    net = window_net()
    images = torch.randn(2, 3, 16, 16)
    # defaults: short sides 0.875, 1, 1.5, 1.875 and 2.5 times 16, crops of round(0.875 * 16) = 14
    sizes, crop = [14, 16, 24, 30, 40], 14
    views = []
    for size in sizes:
        resized = F.interpolate(
            images, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        views += reference_ten_crop(resized, crop)
    assert len(views) == 50
    torch.testing.assert_close(tta_probabilities(net, images, "multi_scale_ten_crop"), mean_probs(net, views))
    custom = [
        v
        for size in (12, 20)
        for v in reference_ten_crop(
            F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False), 10
        )
    ]
    torch.testing.assert_close(
        tta_probabilities(net, images, "multi_scale_ten_crop", crop_size=10, scales=[12, 20]),
        mean_probs(net, custom),
    )


def test_color_pca_views_shift_pixels_along_each_principal_component():
    torch.manual_seed(0)
    train = torch.rand(20, 3, 6, 6) * torch.tensor([1.0, 0.5, 0.2]).view(1, 3, 1, 1)
    stats = ImageStatistics().fit(train)
    pixels = torch.rand(2, 3, 6, 6)
    images = stats.apply(pixels)  # the preprocessed test batch the model sees
    net = window_net()
    eigval, eigvec = stats.eigval, stats.eigvec
    # AlexNet's lighting at +-alpha on each component, in [0, 1] pixel units, then the same preprocessing
    views = [images] + [
        stats.apply(pixels + (sign * 0.5 * eigval[k] * eigvec[:, k]).view(1, 3, 1, 1))
        for k in range(3)
        for sign in (1, -1)
    ]
    shifts = color_pca_shifts(eigval, eigvec, images, alpha=0.5, preprocess=stats.apply)
    probs = tta_probabilities(net, images, "color_pca", color_shifts=shifts)
    torch.testing.assert_close(probs, mean_probs(net, views))
    # the shift divides by the training std: channel c moves by alpha * lambda_k * v_k[c] / std[c]
    expected_first = 0.5 * eigval[0] * eigvec[:, 0] / stats.std
    torch.testing.assert_close(shifts[0][0, :, 0, 0], expected_first)


class StatsData:
    """Stands in for a DataModule: only its fitted ``stats`` is read by the color_pca mode."""

    def __init__(self, stats):
        self.stats = stats


def test_each_mode_is_logged_beside_the_plain_accuracy_and_the_first_as_acc_tta(monkeypatch):
    torch.manual_seed(0)
    modes = ["multi_scale_ten_crop", "dense", "color_pca"]
    model = ImageClassifier(
        "small_cnn", num_classes=3, in_channels=3, tta=modes, tta_kwargs={"color_pca": {"alpha": 2.0}}
    ).eval()
    stats = ImageStatistics().fit(torch.rand(10, 3, 16, 16))
    monkeypatch.setattr(ImageClassifier, "_color_statistics", lambda self: stats)
    pixels, targets = torch.rand(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 2])
    images = stats.apply(pixels)
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    with torch.no_grad():
        model.test_step((images, targets), 0)
        plain = images[..., 1:15, 1:15]  # the centre crop of the crop mode: round(0.875 * 16) = 14
        expected = {
            "multi_scale_ten_crop": tta_probabilities(model, images, "multi_scale_ten_crop"),
            "dense": tta_probabilities(model, images, "dense"),
            "color_pca": mean_probs(
                model,
                [images]
                + [
                    stats.apply(pixels + (s * 2.0 * stats.eigval[k] * stats.eigvec[:, k]).view(1, 3, 1, 1))
                    for k in range(3)
                    for s in (1, -1)
                ],
            ),
        }
        acc = {m: (p.argmax(1) == targets).float().mean().item() for m, p in expected.items()}
        plain_acc = (model(plain).argmax(1) == targets).float().mean().item()
    assert logged["test/acc"].compute() == pytest.approx(plain_acc)
    for mode in modes:
        assert logged[f"test/acc_tta_{mode}"].compute() == pytest.approx(acc[mode])
    assert logged["test/acc_tta"] is logged["test/acc_tta_multi_scale_ten_crop"]
    torch.testing.assert_close(model.predict_step((images, targets), 0), expected["multi_scale_ten_crop"])


def test_color_pca_without_training_statistics_names_the_fix():
    model = ImageClassifier("small_cnn", num_classes=3, in_channels=3, tta="color_pca")
    with pytest.raises(
        RuntimeError, match=r"color_pca' needs the training split's colour PCA.*no DataModule.*model\.tta"
    ):
        model.predict_step(torch.randn(2, 3, 8, 8), 0)


@pytest.mark.parametrize(
    ("tta", "tta_kwargs", "match"),
    [
        ("sideways", None, r"tta must be None, one or a list of .*dense.*; got \['sideways'\]"),
        (["hflip", "hflip"], None, "tta lists a mode twice"),
        ("hflip", {"ten_crop": {"crop_size": 8}}, r"tta_kwargs has an entry for 'ten_crop'.*not in tta"),
        ("dense", {"dense": {"crop_size": 8}}, r"tta_kwargs.dense has unknown option\(s\) \['crop_size'\]"),
        (
            "ten_crop",
            {"ten_crop": {"crop_size": 0}},
            r"tta_kwargs.ten_crop.crop_size must be an integer >= 1",
        ),
        (
            "multi_scale_ten_crop",
            {"multi_scale_ten_crop": {"crop_size": 20, "scales": [16, 24]}},
            r"crop_size=20 exceeds the smallest scale 16",
        ),
        ("color_pca", {"color_pca": {"alpha": 0}}, r"tta_kwargs.color_pca.alpha must be > 0, got 0"),
    ],
)
def test_bad_tta_settings_fail_at_construction_naming_the_key(tta, tta_kwargs, match):
    with pytest.raises(ValueError, match=match):
        ImageClassifier("small_cnn", num_classes=3, in_channels=3, tta=tta, tta_kwargs=tta_kwargs)
