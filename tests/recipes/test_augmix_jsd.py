"""AugMix's Jensen-Shannon consistency loss: the formula, the recipe's objective, and mismatched setups."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from helpers import quiet_trainer_kwargs
from scipy.stats import entropy

from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.recipes import ImageClassifier
from lightning_tricks.recipes.consistency import jensen_shannon, split_views
from lightning_tricks.recipes.regularization import RegularizationConfig


def _scipy_jsd(*logits: torch.Tensor) -> float:
    """JS(p_1..p_k) = H(M) - 1/k sum_i H(p_i), M = 1/k sum_i p_i, per row, then the batch mean."""
    probs = [torch.softmax(x.double(), dim=1).numpy() for x in logits]
    mixture = np.mean(probs, axis=0)
    per_row = entropy(mixture, axis=1) - np.mean([entropy(p, axis=1) for p in probs], axis=0)
    return float(per_row.mean())


def test_jensen_shannon_matches_the_entropy_formula():
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(16, 10, generator=generator) * 3 for _ in range(3)]
    assert jensen_shannon(*logits).item() == pytest.approx(_scipy_jsd(*logits), rel=1e-5)
    assert jensen_shannon(logits[0], logits[0], logits[0]).item() == pytest.approx(0.0, abs=1e-7)
    # Two distributions: SciPy's jensenshannon is the square root of the divergence (natural log).
    from scipy.spatial.distance import jensenshannon

    p, q = (torch.softmax(x[0].double(), 0).numpy() for x in logits[:2])
    assert jensen_shannon(logits[0][:1], logits[1][:1]).item() == pytest.approx(
        jensenshannon(p, q) ** 2, rel=1e-5
    )


def test_classifier_objective_is_clean_cross_entropy_plus_lambda_jsd():
    torch.manual_seed(0)
    model = ImageClassifier(
        "mlp",
        num_classes=10,
        in_channels=1,
        model_kwargs={"input_size": 8},
        regularization=RegularizationConfig(jsd_lambda=12.0),
    )
    logits = torch.randn(12, 10)  # [clean; view 1; view 2] of 4 images
    targets = torch.tensor([3, 1, 4, 1]).repeat(3)
    loss, consistency = model.augmix_loss(logits, targets)
    clean = logits[:4].double()
    cross_entropy = -(clean.log_softmax(1)[torch.arange(4), targets[:4]]).mean().item()
    jsd = _scipy_jsd(logits[:4], logits[4:8], logits[8:])
    assert consistency.item() == pytest.approx(jsd, rel=1e-5)
    assert loss.item() == pytest.approx(cross_entropy + 12.0 * jsd, rel=1e-5)
    with model.regularization_scaled(0.0):  # regularisation off: the plain clean cross-entropy
        assert model.augmix_loss(logits, targets)[0].item() == pytest.approx(cross_entropy, rel=1e-6)


def test_batch_that_is_not_three_views_fails_naming_the_data_option():
    with pytest.raises(ValueError, match=r"regularization.jsd_lambda needs batches of 3 views.*augmix_jsd"):
        split_views(torch.zeros(10, 4))


def test_negative_lambda_fails_naming_the_key():
    with pytest.raises(ValueError, match=r"regularization.jsd_lambda must be >= 0, got -1"):
        RegularizationConfig(jsd_lambda=-1)


def _model(jsd_lambda: float) -> ImageClassifier:
    return ImageClassifier(
        "mlp",
        num_classes=10,
        in_channels=1,
        model_kwargs={"input_size": 8},
        regularization=RegularizationConfig(jsd_lambda=jsd_lambda),
    )


def test_fit_without_the_views_fails_before_training(tmp_path):
    trainer = L.Trainer(max_steps=1, **quiet_trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"jsd_lambda=12.0 needs .* data.init_args.augmix_jsd is false"):
        trainer.fit(_model(12.0), datamodule=DigitsDataModule(batch_size=16))
    assert trainer.global_step == 0


def test_fit_with_the_views_trains_on_the_jsd_objective(tmp_path):
    data = DigitsDataModule(batch_size=16, augment="augmix", augment_on_device=False, augmix_jsd=True)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, **quiet_trainer_kwargs(tmp_path))
    model = _model(12.0)
    trainer.fit(model, datamodule=data)
    assert trainer.global_step == 2
    jsd = trainer.callback_metrics["train/jsd"].item()
    assert 0 < jsd < np.log(3)  # the divergence of three distributions is bounded by ln 3
