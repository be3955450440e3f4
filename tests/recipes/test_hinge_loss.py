"""The multi-class hinge (SVM) loss as the recipe's data loss: the formula, the CLI, the init-loss checks."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import quiet_trainer_kwargs

from lightning_tricks.callbacks import InitLossCheck, TrainingDiagnostics
from lightning_tricks.callbacks.sanity import SanityCheckError
from lightning_tricks.cli import build_cli
from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.recipes import ImageClassifier
from lightning_tricks.recipes.models import get_classifier

CONFIGS = Path(__file__).parents[2] / "configs"


def _hinge(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Weston-Watkins hinge, divided by C as torch does: mean_i sum_{j != y_i} max(0, 1 - x_iy + x_ij) / C."""
    n, c = logits.shape
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        y = int(targets[i])
        for j in range(c):
            if j != y:
                total += max(0.0, 1.0 - float(logits[i, y]) + float(logits[i, j])) / c
    return total / n


def test_multi_margin_data_loss_is_the_hinge_formula() -> None:
    module = ImageClassifier("linear", num_classes=5, in_channels=1, loss="multi_margin")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(12, 5, generator=generator) * 2
    targets = torch.randint(0, 5, (12,), generator=generator)
    torch.testing.assert_close(module.data_loss(logits, targets).double(), _hinge(logits, targets))
    # a margin of at least 1 over every other class costs nothing
    confident = torch.nn.functional.one_hot(targets, 5).float() * 1.5
    assert float(module.data_loss(confident, targets)) == 0.0
    with pytest.raises(ValueError, match=r"loss='multi_margin' needs class-index targets.*shape \(12, 5\)"):
        module.data_loss(logits, torch.softmax(logits, 1))


def test_cli_trains_with_the_hinge_loss_and_reports_it(tmp_path) -> None:
    cli = build_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits.yaml"),
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=1",
            "--model.init_args.model=small_cnn",
            "--model.init_args.loss=multi_margin",
            "--data.init_args.image_size=8",
        ]
    )
    assert cli.model.loss == "multi_margin"
    model = cli.model.eval()
    with torch.no_grad():
        batches = [
            (model(cli.datamodule.normalize_images(x)), y) for x, y in cli.datamodule.test_dataloader()
        ]
    logits, targets = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    # the logged test loss is the hinge loss of the tested model, not a cross-entropy
    tested = cli.trainer.callback_metrics["test/loss"].item()
    assert tested == pytest.approx(float(_hinge(logits, targets)), rel=1e-4)
    assert cli.trainer.callback_metrics["test/acc"].item() > 0.5  # it learns: 10-class chance is 0.1


def test_label_smoothing_with_the_hinge_loss_is_refused() -> None:
    with pytest.raises(
        ValueError, match=r"loss='multi_margin' needs class-index targets.*label_smoothing=0.1"
    ):
        ImageClassifier("linear", loss="multi_margin", regularization={"label_smoothing": 0.1})
    with pytest.raises(ValueError, match=r"loss='hinge' is unknown; valid: cross_entropy, multi_margin"):
        ImageClassifier("linear", loss="hinge")


def test_mixup_with_the_hinge_loss_is_refused_before_training(tmp_path) -> None:
    module = ImageClassifier("small_cnn", num_classes=10, in_channels=1, loss="multi_margin")
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path), max_steps=1)
    with pytest.raises(ValueError, match=r"model.init_args.loss='multi_margin'.*batch_augment=\['mixup'\]"):
        trainer.fit(module, DigitsDataModule(batch_size=32, image_size=8, batch_augment="mixup"))


def _hinge_module(logit_scale: float = 1.0) -> ImageClassifier:
    L.seed_everything(0)
    module = ImageClassifier("small_cnn", num_classes=10, in_channels=1, loss="multi_margin")
    with torch.no_grad():
        get_classifier(module.net).weight.mul_(logit_scale)  # large last-layer weights: large logits
    return module


def _fit(tmp_path, module: ImageClassifier, callbacks: list) -> None:
    kwargs = quiet_trainer_kwargs(tmp_path)
    trainer = L.Trainer(**kwargs, max_steps=1, limit_val_batches=1, callbacks=callbacks)
    trainer.fit(module, DigitsDataModule(batch_size=32, image_size=8))


def test_init_loss_check_expects_c_minus_1_over_c_for_the_hinge_loss(tmp_path) -> None:
    c = 10
    hinge_at_zero = float(_hinge(torch.zeros(4, c), torch.arange(4)))  # every wrong class costs 1, / C
    assert hinge_at_zero == pytest.approx((c - 1) / c)
    check = InitLossCheck(num_batches=4, on_fail="raise")
    _fit(tmp_path, _hinge_module(), [check])
    assert check.passed is True
    assert check.expected == pytest.approx(hinge_at_zero)
    # the small initial logit spread can only raise the hinge (Jensen: E max(0, 1 + d) >= 1 for E d = 0)
    assert hinge_at_zero - 0.02 <= check.measured <= hinge_at_zero + 0.15

    check = InitLossCheck(num_batches=4, on_fail="raise")
    with pytest.raises(
        SanityCheckError,
        match=r"initialization \d+\.\d+, expected \(C-1\)/C = 9/10 = 0\.9000 for the multi-class hinge",
    ):
        _fit(tmp_path, _hinge_module(logit_scale=100.0), [check])
    assert check.passed is False and check.measured > 1.3 * hinge_at_zero


def test_training_diagnostics_init_check_expects_c_minus_1_over_c_for_the_hinge_loss(tmp_path) -> None:
    expected = 9 / 10
    healthy = TrainingDiagnostics()
    _fit(tmp_path, _hinge_module(), [healthy])
    assert healthy.init["expected_loss"][0] == pytest.approx(expected)
    assert expected - 0.02 <= healthy.init["initial_loss"] <= expected + 0.15
    assert "init_loss" not in {f.check for f in healthy.findings}

    scaled = TrainingDiagnostics()
    _fit(tmp_path, _hinge_module(logit_scale=100.0), [scaled])
    assert scaled.init["initial_loss"] > 1.5 * expected
    (finding,) = [f for f in scaled.findings if f.check == "init_loss"]
    assert "expected about (C-1)/C = 9/10 = 0.9000 for the multi-class hinge loss" in finding.message
    assert "far from uniform" in finding.cause
