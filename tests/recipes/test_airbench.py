"""The airbench-style network: patch whitening, identity-initialised convs, scale-free BatchNorm, TTA."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import ddp_trainer_kwargs, quiet_trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.recipes import ImageClassifier, OptimizerConfig
from lightning_tricks.recipes.models import create_model
from lightning_tricks.recipes.tta import tta_probabilities


def small_airbench(**kwargs) -> nn.Module:
    return create_model("airbench", num_classes=5, widths=(8, 16, 16), **kwargs)


def test_whitening_filters_equal_an_independent_eigendecomposition_of_the_patches():
    torch.manual_seed(0)
    # Correlated channels, so the eigenvalues are well separated and far from eps.
    images = torch.randn(6, 3, 9, 9) + 0.5 * torch.randn(6, 1, 9, 9)
    net = small_airbench(whitening_size=2, whitening_eps=1e-3)
    net.init_whitening(images)

    x = images.double().numpy()
    rows = [
        x[n, :, i : i + 2, j : j + 2].reshape(-1)  # (c, y, x) order, as conv weights are laid out
        for n in range(x.shape[0])
        for i in range(8)
        for j in range(8)
    ]
    patches = np.stack(rows)
    eigenvalues, eigenvectors = np.linalg.eigh(patches.T @ patches / len(patches))
    order = np.argsort(eigenvalues)[::-1]
    expected = (eigenvectors[:, order] / np.sqrt(eigenvalues[order] + 1e-3)).T  # (12, 12), one filter a row

    weight = net.whiten.weight.detach().double().numpy().reshape(24, 12)
    first, second = weight[:12], weight[12:]
    np.testing.assert_allclose(second, -first)
    signs = np.sign((first * expected).sum(axis=1))  # eigenvectors are defined up to sign
    np.testing.assert_allclose(first * signs[:, None], expected, rtol=1e-4, atol=1e-5)
    assert bool(net.whitening_initialized)
    assert not net.whiten.weight.requires_grad and net.whiten.bias.requires_grad


def test_convs_start_as_identity_and_batchnorm_has_no_learned_scale():
    net = small_airbench()
    block = net.blocks[1]  # 8 -> 16 channels
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        out = block.conv1(x)
    torch.testing.assert_close(out[:, :8], x)  # Dirac filters pass the input channels through
    norms = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6
    assert all(not m.weight.requires_grad and m.bias.requires_grad for m in norms)
    assert all(torch.equal(m.weight, torch.ones_like(m.weight)) for m in norms)


def test_bad_whitening_input_fails_early():
    net = small_airbench()
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        net.init_whitening(torch.randn(4, 1, 8, 8))


def test_flip_translate_tta_is_the_mean_over_six_views_computed_by_hand():
    torch.manual_seed(0)
    net = small_airbench().eval()
    images = torch.randn(4, 3, 12, 12)
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = [images, padded[..., :12, :12], padded[..., 2:, 2:]]
    # Independent check of the shift: the down-right view's pixel (0, 0) is the image's (1, 1).
    torch.testing.assert_close(shifted[2][..., 0, 0], images[..., 1, 1])
    views = [v for s in shifted for v in (s, s.flip(-1))]
    with torch.no_grad():
        expected = torch.stack([net(v).softmax(1) for v in views]).mean(0)
    torch.testing.assert_close(tta_probabilities(net, images, "flip_translate"), expected)


def test_classifier_initialises_whitening_from_the_first_training_batch_only():
    torch.manual_seed(0)
    model = ImageClassifier("airbench", num_classes=5, model_kwargs={"widths": (8, 16, 16)})
    first, second = torch.randn(8, 3, 10, 10), torch.randn(8, 3, 10, 10)
    reference = small_airbench()
    reference.init_whitening(first)

    class _Trainer:
        world_size = 1

    model._trainer = _Trainer()  # the hook only reads world_size
    model.on_train_batch_start((first, torch.zeros(8, dtype=torch.long)), 0)
    model.on_train_batch_start((second, torch.zeros(8, dtype=torch.long)), 1)
    torch.testing.assert_close(model.net.whiten.weight, reference.whiten.weight)


def test_whitening_off_makes_the_first_layer_a_plain_trained_conv(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(
        "airbench",
        num_classes=5,
        model_kwargs={"widths": (8, 16, 16), "whitening": False},
        optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.9),
    )
    torch.manual_seed(0)
    default = nn.Conv2d(3, 24, 2)  # the same draw as PyTorch's default init of that layer
    start = model.net.whiten.weight.detach().clone()
    torch.testing.assert_close(start, default.weight.detach())
    trainer = L.Trainer(max_epochs=1, limit_train_batches=2, **quiet_trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=_image_loader())
    assert not bool(model.net.whitening_initialized)
    assert model.net.whiten.weight.requires_grad and not torch.equal(model.net.whiten.weight, start)
    with pytest.raises(ValueError, match="init_whitening needs whitening=True"):
        model.net.init_whitening(torch.randn(4, 3, 8, 8))


def _image_loader(n: int = 64, size: int = 16, batch: int = 8) -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(n, 3, size, size, generator=generator)
    return DataLoader(TensorDataset(images, torch.randint(5, (n,), generator=generator)), batch_size=batch)


class BiasPerEpoch(L.Callback):
    """The whitening bias and a block bias at the start of every epoch and at the end of training."""

    def __init__(self) -> None:
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def _record(self, pl_module) -> None:
        net = pl_module.net
        self.seen.append((net.whiten.bias.detach().clone(), net.blocks[0].norm1.bias.detach().clone()))

    def on_train_epoch_start(self, trainer, pl_module):
        self._record(pl_module)

    def on_train_end(self, trainer, pl_module):
        self._record(pl_module)


def test_whitening_bias_trains_for_its_epochs_then_stays_frozen(tmp_path):
    torch.manual_seed(0)
    model = ImageClassifier(
        "airbench",
        num_classes=5,
        model_kwargs={"widths": (8, 16, 16), "whitening_bias_epochs": 1},
        optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, weight_decay=1e-2),
    )
    record = BiasPerEpoch()
    trainer = L.Trainer(max_epochs=3, callbacks=[record], **quiet_trainer_kwargs(tmp_path))
    trainer.fit(model, train_dataloaders=_image_loader())
    (w0, _), (w1, b1), (w2, b2), (w3, b3) = record.seen  # starts of epochs 0, 1, 2 and the end
    assert not torch.equal(w0, w1)  # trained in epoch 0
    assert torch.equal(w1, w2) and torch.equal(w2, w3)  # frozen from epoch 1 on (momentum, decay too)
    assert not torch.equal(b1, b2) and not torch.equal(b2, b3)  # the rest keeps training
    assert not model.net.whiten.bias.requires_grad


def test_whitening_bias_epochs_is_checked():
    with pytest.raises(ValueError, match=r"whitening_bias_epochs must be None .* got -1; airbench94 uses 3"):
        small_airbench(whitening_bias_epochs=-1)


class FirstBatchAndFilters(L.Callback):
    """Each rank's first training batch and its whitening filters after the first step, saved to a file."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.first_batch = batch[0].detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            payload = {"batch": self.first_batch, "filters": pl_module.net.whiten.weight.detach().clone()}
            torch.save(payload, Path(self.out) / f"rank{trainer.global_rank}.pt")


def whitening_on_two_ranks(directory):
    torch.manual_seed(0)
    model = ImageClassifier("airbench", num_classes=5, model_kwargs={"widths": (8, 16, 16)})
    trainer = L.Trainer(
        **ddp_trainer_kwargs(directory), max_steps=1, callbacks=[FirstBatchAndFilters(str(directory))]
    )
    trainer.fit(model, train_dataloaders=_image_loader())


@pytest.mark.ddp(scenario=whitening_on_two_ranks)
def test_ddp_whitening_filters_are_rank_zeros_on_every_rank(ddp_scenario):
    ranks = [torch.load(ddp_scenario.directory / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert not torch.equal(ranks[0]["batch"], ranks[1]["batch"])  # the ranks saw different images
    assert torch.equal(ranks[0]["filters"], ranks[1]["filters"])
    expected = small_airbench()
    expected.init_whitening(ranks[0]["batch"])  # computed from rank 0's batch, broadcast to rank 1
    torch.testing.assert_close(ranks[1]["filters"], expected.whiten.weight)
