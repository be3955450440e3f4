from __future__ import annotations

import lightning as L
import numpy as np
import torch
from helpers import PlainClassifier, quiet_trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tricks.datamodules.stats import ImageStatistics, channel_mean_std
from lightning_tricks.datamodules.synthetic import SyntheticDataModule


def _images(n=200, c=3, size=6, seed=0):
    return torch.randint(
        0, 256, (n, c, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def test_mean_std_and_colour_pca_match_numpy():
    images = _images()
    stats = ImageStatistics().fit(images)
    x = images.numpy().astype(np.float64) / 255.0
    np.testing.assert_allclose(stats.mean.numpy(), x.mean(axis=(0, 2, 3)), atol=1e-6)
    np.testing.assert_allclose(stats.std.numpy(), x.std(axis=(0, 2, 3)), atol=1e-6)
    pixels = x.transpose(1, 0, 2, 3).reshape(3, -1)
    eigval, eigvec = np.linalg.eigh(np.cov(pixels, bias=True))
    np.testing.assert_allclose(stats.eigval.numpy(), eigval[::-1], rtol=1e-4)
    # Eigenvectors are defined up to sign.
    np.testing.assert_allclose(np.abs(stats.eigvec.numpy()), np.abs(eigvec[:, ::-1]), atol=1e-4)


def test_mean_image_and_zca_match_numpy():
    images = _images(n=300, c=1, size=4)
    eps = 0.1
    stats = ImageStatistics(whitening="zca", eps=eps).fit(images)
    x = images.numpy().astype(np.float64).reshape(300, -1) / 255.0
    image_mean = x.mean(axis=0)
    std = x.std()  # one channel: the channel std over all pixels
    z = (x - image_mean) / std
    lam, u = np.linalg.eigh(z.T @ z / len(z))
    w = u @ np.diag(1 / np.sqrt(lam + eps)) @ u.T
    out = stats.apply(images).numpy().reshape(300, -1)
    np.testing.assert_allclose(out, z @ w.T, atol=1e-4)
    pca = ImageStatistics(whitening="pca", eps=eps, normalize=False).fit(images)
    whitened = pca.apply(images).numpy().reshape(300, -1)
    cov = whitened.T @ whitened / 300
    np.testing.assert_allclose(np.diag(cov), np.sort(lam * std**2 / (lam * std**2 + eps))[::-1], atol=1e-4)
    mean_only = ImageStatistics(mean_image=True, normalize=False).fit(images)
    np.testing.assert_allclose(mean_only.apply(images).numpy().reshape(300, -1), x - image_mean, atol=1e-6)


class RecordingClassifier(PlainClassifier):
    """A user's classifier that remembers the (preprocessed) test inputs it saw."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.test_inputs = []

    def test_step(self, batch, batch_idx):
        self.test_inputs.append(batch[0].detach().clone())
        return super().test_step(batch, batch_idx)


def test_statistics_travel_in_checkpoint_and_are_used_at_test(tmp_path):
    kwargs = dict(
        num_classes=3, image_size=4, in_channels=2, num_train=64, num_val=16, num_test=16, batch_size=32
    )
    dm = SyntheticDataModule(seed=0, **kwargs)
    model = RecordingClassifier(num_classes=3, in_features=32)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer_kwargs = {**quiet_trainer_kwargs(tmp_path), "enable_checkpointing": True}
    L.Trainer(max_epochs=1, callbacks=[ckpt], **trainer_kwargs).fit(model, datamodule=dm)
    saved = torch.load(ckpt.last_model_path, weights_only=True)["SyntheticDataModule"]["statistics"]
    assert torch.equal(saved["mean"], dm.mean) and torch.equal(saved["std"], dm.std)

    # Another training split (seed 1) computes other statistics in setup; the checkpoint's win.
    other = SyntheticDataModule(seed=1, **kwargs)
    fresh = ImageStatistics().fit(SyntheticDataModule(seed=1, **kwargs).load_splits()["train"][0])
    assert not torch.allclose(fresh.mean, dm.mean)
    L.Trainer(**trainer_kwargs).test(model, datamodule=other, ckpt_path=ckpt.last_model_path)
    assert torch.equal(other.mean, saved["mean"]) and torch.equal(other.std, saved["std"])
    raw = other._splits["test"].tensors[0][:16].float() / 255
    expected = (raw - saved["mean"].view(1, -1, 1, 1)) / saved["std"].view(1, -1, 1, 1)
    assert torch.allclose(model.test_inputs[0], expected, atol=1e-6)


def test_in_memory_cache_reused(tmp_path, monkeypatch):
    calls = []
    fit = ImageStatistics.fit

    def counting(self, *args, **kwargs):
        calls.append(1)
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(ImageStatistics, "fit", counting)
    kwargs = dict(image_size=4, num_train=32, num_val=8, num_test=8)
    first = SyntheticDataModule(**kwargs)
    first.stats_cache = tmp_path
    first.setup("fit")
    second = SyntheticDataModule(**kwargs)
    second.stats_cache = tmp_path
    second.setup("fit")
    assert len(calls) == 1 and torch.equal(first.mean, second.mean)
    third = SyntheticDataModule(seed=5, **kwargs)  # other training data: its own cache entry
    third.stats_cache = tmp_path
    third.setup("fit")
    assert len(calls) == 2 and len(list(tmp_path.glob("*.pt"))) == 2
    state = torch.load(next(tmp_path.glob("*.pt")), weights_only=True)
    assert set(state) == {"mean", "std", "eigval", "eigvec"}


def test_statistics_are_copied_to_a_device_once_and_again_only_after_they_change():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=generator)
    stats = ImageStatistics(normalize=True)
    stats.fit(images)
    batch = torch.zeros(4, 3, 8, 8, device="meta")  # a second device without moving data
    stats.apply(batch)
    first = stats._on("mean", batch.device)
    stats.apply(batch)
    assert stats._on("mean", batch.device) is first, "the device copy must be reused across batches"
    restored = ImageStatistics(normalize=True)
    restored.load_state_dict({name: value + 1 for name, value in stats.state_dict().items()})
    stats.load_state_dict(restored.state_dict())
    stats.apply(batch)
    assert stats._on("mean", batch.device) is not first, "new statistics must be copied again"


def test_channel_mean_std_equals_numpy_across_chunks():
    generator = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (37, 3, 5, 5), dtype=torch.uint8, generator=generator)
    mean, std = channel_mean_std(images, chunk_size=8)  # several chunks, the last one partial
    pixels = images.numpy().astype(np.float64) / 255.0
    np.testing.assert_allclose(mean.numpy(), pixels.mean(axis=(0, 2, 3)), rtol=1e-5)
    np.testing.assert_allclose(std.numpy(), pixels.std(axis=(0, 2, 3)), rtol=1e-4)
