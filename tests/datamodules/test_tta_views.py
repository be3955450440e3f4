from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.transforms.v2 import functional as TF

from lightning_tricks.recipes.tta import tta_probabilities


class PooledNet(nn.Module):
    """A small CNN with global pooling, so it accepts any input size."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(
            nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)
        )

    def forward(self, x):
        return self.net(x)


def _mean_probs(model, views):
    return torch.stack([model(v).softmax(-1) for v in views]).mean(0)


def test_tta_equals_mean_of_manual_views():
    model = PooledNet().eval()
    images = torch.randn(3, 3, 16, 20)
    out = tta_probabilities(model, images, "hflip")
    assert torch.allclose(out, _mean_probs(model, [images, images.flip(-1)]), atol=1e-6)

    out = tta_probabilities(model, images, "ten_crop", crop_size=12)
    views = []
    for img in (images, images.flip(-1)):
        h, w = img.shape[-2:]
        for top, left in ((0, 0), (0, w - 12), (h - 12, 0), (h - 12, w - 12), ((h - 12) // 2, (w - 12) // 2)):
            views.append(img[..., top : top + 12, left : left + 12])
    assert torch.allclose(out, _mean_probs(model, views), atol=1e-6)
    assert torch.allclose(out.sum(-1), torch.ones(3), atol=1e-6)

    out = tta_probabilities(model, images, "multi_scale", scales=(12, 16))
    resized = [TF.resize(images, [12], antialias=True), images]
    assert torch.allclose(out, _mean_probs(model, [v for r in resized for v in (r, r.flip(-1))]), atol=1e-6)


def test_tta_rejects_bad_modes_and_sizes():
    model = PooledNet()
    modes = r"valid modes are \['hflip', 'ten_crop', 'multi_scale', 'flip_translate', 'dense'"
    with pytest.raises(ValueError, match=modes):
        tta_probabilities(model, torch.zeros(1, 3, 8, 8), "five_crop")
    with pytest.raises(ValueError, match="crop_size <= image side 8"):
        tta_probabilities(model, torch.zeros(1, 3, 8, 8), "ten_crop", crop_size=10)
