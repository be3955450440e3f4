"""Per-pixel standardisation (std image) and what the whitening epsilon does, against numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.datamodules.stats import STD_IMAGE_FLOOR, ImageStatistics, to_unit_float


def _images(n: int = 120, c: int = 2, size: int = 5, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, c, size, size), generator=generator, dtype=torch.uint8)
    images[:, :, 0, 0] = 7  # a pixel that never varies: its std is floored
    return images


def test_std_image_standardises_each_pixel_like_numpy() -> None:
    images = _images()
    stats = ImageStatistics(std_image=True).fit(images[:100])
    train = images[:100].numpy().astype(np.float64) / 255.0
    mean_image, std_image = train.mean(axis=0), train.std(axis=0)  # population std, per (c, h, w)
    np.testing.assert_allclose(stats.image_std.numpy(), std_image, atol=1e-6)
    np.testing.assert_allclose(stats.image_mean.numpy(), mean_image, atol=1e-6)
    held_out = images[100:].numpy().astype(np.float64) / 255.0  # training statistics on other images
    expected = (held_out - mean_image) / np.maximum(std_image, STD_IMAGE_FLOOR)
    np.testing.assert_allclose(stats.apply(images[100:]).numpy(), expected, rtol=1e-5, atol=1e-5)
    # it is not the per-channel standardisation
    channel = ImageStatistics(mean_image=True).fit(images[:100]).apply(images[100:]).numpy()
    assert not np.allclose(channel, expected, atol=1e-2)


def test_std_image_settings_are_checked() -> None:
    with pytest.raises(ValueError, match=r"std_image=True .* normalize=False switches off"):
        ImageStatistics(std_image=True, normalize=False)
    stats = ImageStatistics(std_image=True)
    stats.fit_stream([_images(8)])  # no fixed size given: no std image
    with pytest.raises(RuntimeError, match="std_image/whitening need fixed-size images"):
        stats.apply(_images(2))


def test_std_image_is_cached_and_checkpointed_by_the_datamodule(tmp_path) -> None:
    kwargs = dict(image_size=8, std_image=True, stats_cache=tmp_path)
    first = DigitsDataModule(**kwargs)
    first.setup("fit")
    (cache,) = tmp_path.glob("*.pt")
    assert "image_std" in torch.load(cache, weights_only=True)
    train = to_unit_float(first._splits["train"].tensors[0]).numpy().astype(np.float64)
    np.testing.assert_allclose(first.stats.image_std.numpy(), train.std(axis=0), atol=1e-6)
    # the per-channel run has its own cache entry (the option is part of the fingerprint)
    DigitsDataModule(**{**kwargs, "std_image": False}).setup("fit")
    assert len(list(tmp_path.glob("*.pt"))) == 2
    # a checkpointed state brings the std image back into a DataModule of another split
    restored = DigitsDataModule(**{**kwargs, "seed": 3, "stats_cache": None})
    restored.load_state_dict(first.state_dict())
    assert torch.equal(restored.stats.image_std, first.stats.image_std)


@pytest.mark.parametrize("mode", ["zca", "pca"])
def test_whitened_covariance_has_eigenvalues_lambda_over_lambda_plus_eps(mode: str) -> None:
    """The default eps=1e-2 on the standardised digits: whitened eigenvalues are lambda / (lambda + eps)."""
    x8 = torch.tensor(load_digits().images, dtype=torch.uint8).unsqueeze(1) * 15  # 0..240, real images
    stats = ImageStatistics(whitening=mode, whitening_samples=len(x8)).fit(x8)
    assert stats.eps == 1e-2
    x = x8.numpy().astype(np.float64).reshape(len(x8), -1) / 255.0
    z = (x - x.mean(axis=0)) / x.std()  # standardised: mean image, the one channel's std
    lam = np.linalg.eigvalsh(z.T @ z / len(z))
    whitened = stats.apply(x8).numpy().reshape(len(x8), -1).astype(np.float64)
    got = np.linalg.eigvalsh(whitened.T @ whitened / len(whitened))
    np.testing.assert_allclose(np.sort(got), np.sort(lam / (lam + stats.eps)), atol=2e-3)
    # only partly white: directions with lambda below eps keep eigenvalues far below 1
    assert (lam < stats.eps).sum() >= 5 and np.sort(got)[:5].max() < 0.5
