"""ProgressiveResizing: the training size at every step against Composer's schedule written out here,
full-size evaluation, the folder DataModule, resuming, and bad arguments."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from data_files import make_tree
from helpers import PlainClassifier, digits_loaders

from lightning_tricks.callbacks import ProgressiveResizing
from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.datamodules.folder import ImageFolderDataModule
from lightning_tricks.recipes import ImageClassifier


def composer_side(
    step: int, total: int, full: int, initial: float, delay: float, finetune: float, inc: int
) -> int:
    """MosaicML Composer's ProgressiveResizing rule, written out from its description."""
    t = step / total
    ramp = 0.0 if t < delay else min((t - delay) / (1 - finetune - delay), 1.0)
    if ramp == 1.0:
        return full
    scale = initial + (1 - initial) * ramp
    return min(full, max(inc, round(full * scale / inc) * inc))


class InputSizes(L.Callback):
    """Records the spatial size of every batch the network sees, in training and in validation."""

    def __init__(self):
        self.train: list[tuple[int, int]] = []
        self.val: list[tuple[int, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.train.append(tuple(batch[0].shape[-2:]))

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.val.append(tuple(batch[0].shape[-2:]))


def fit(callbacks, max_steps, ckpt_path=None, datamodule=None, **trainer_kwargs):
    torch.manual_seed(0)
    model = ImageClassifier("small_cnn", num_classes=10, in_channels=1, model_kwargs={"widths": [4, 4]})
    trainer = L.Trainer(
        max_steps=max_steps,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(model, datamodule or DigitsDataModule(batch_size=64, image_size=32), ckpt_path=ckpt_path)
    return trainer


def test_each_training_step_has_the_size_of_composers_schedule_and_evaluation_is_full_size():
    sizes = InputSizes()
    resizing = ProgressiveResizing(
        initial_scale=0.25, delay_fraction=0.2, finetune_fraction=0.3, size_increment=4
    )
    trainer = fit([resizing, sizes], max_steps=12, val_check_interval=6)
    expected = [composer_side(s, 12, 32, 0.25, 0.2, 0.3, 4) for s in range(12)]
    assert [h for h, _ in sizes.train] == expected
    assert all(h == w for h, w in sizes.train)
    assert expected[0] == 8 and expected[-1] == 32 and len(set(expected)) > 3  # a real ramp
    assert sizes.val and set(sizes.val) == {(32, 32)}
    assert trainer.callback_metrics["train/image_size"].item() == expected[-1]
    assert trainer.datamodule.train_resize is None  # detached when the fit ends


def test_stages_make_a_stepwise_ramp():
    sizes = InputSizes()
    fit([ProgressiveResizing(initial_scale=0.5, finetune_fraction=0.25, stages=2), sizes], max_steps=8)
    # ramp = min(t / 0.75, 1) floored to halves: 0 for t < 0.375, 1/2 until 0.75, then full size
    assert [h for h, _ in sizes.train] == [16, 16, 16, 24, 24, 24, 32, 32]


class SaveAt(L.Callback):
    def __init__(self, step: int, path):
        self.step, self.path = step, path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.save_checkpoint(self.path)


def test_a_resumed_run_follows_the_original_schedule_even_with_a_longer_run(tmp_path):
    ckpt = tmp_path / "mid.ckpt"
    settings = dict(initial_scale=0.25, finetune_fraction=0.2, size_increment=4)
    whole = InputSizes()
    fit([ProgressiveResizing(**settings), whole, SaveAt(5, ckpt)], max_steps=10)
    resumed = InputSizes()
    fit([ProgressiveResizing(**settings), resumed], max_steps=14, ckpt_path=ckpt)
    assert resumed.train == whole.train[5:] + [(32, 32)] * 4
    fresh_longer = [composer_side(s, 14, 32, 0.25, 0.0, 0.2, 4) for s in range(5, 10)]
    assert [h for h, _ in whole.train[5:]] != fresh_longer  # the saved total steps made the difference


def test_folder_images_shrink_in_training_and_stay_full_size_in_validation(tmp_path):
    make_tree(tmp_path, per_class=4)
    data = ImageFolderDataModule(
        tmp_path, batch_size=4, num_workers=0, crop_size=32, resize_size=36, stats_samples=4, augment="flip"
    )
    sizes = InputSizes()
    torch.manual_seed(0)
    model = ImageClassifier("small_cnn", num_classes=2, in_channels=3, model_kwargs={"widths": [4, 4]})
    trainer = L.Trainer(
        max_epochs=2,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ProgressiveResizing(initial_scale=0.5, finetune_fraction=0.5, stages=1), sizes],
    )
    trainer.fit(model, data)
    assert [h for h, _ in sizes.train] == [16, 16, 32, 32]  # 4 steps: half size, then the full-size half
    assert set(sizes.val) == {(32, 32)}


def test_plain_dataloaders_are_refused_with_the_reason():
    train, val = digits_loaders(n_train=64)
    trainer = L.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, callbacks=[ProgressiveResizing()]
    )
    with pytest.raises(ValueError, match=r"needs a lightning_tricks DataModule .* got plain dataloaders"):
        trainer.fit(PlainClassifier(), train, val)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"initial_scale": 0.0}, r"initial_scale must be in \(0, 1\], got 0.0"),
        ({"initial_scale": 1.5}, r"initial_scale must be in \(0, 1\], got 1.5"),
        ({"delay_fraction": 1.0}, r"delay_fraction must be in \[0, 1\), got 1.0"),
        ({"finetune_fraction": -0.1}, r"finetune_fraction must be in \[0, 1\), got -0.1"),
        (
            {"delay_fraction": 0.5, "finetune_fraction": 0.5},
            r"delay_fraction \+ finetune_fraction must be < 1",
        ),
        ({"size_increment": 0}, r"size_increment must be an integer >= 1, got 0"),
        ({"stages": 0}, r"stages must be None \(linear ramp\) or an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_fail_naming_them(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProgressiveResizing(**kwargs)


def test_the_schedule_function_matches_composer_for_a_long_run():
    resizing = ProgressiveResizing(
        initial_scale=0.5, delay_fraction=0.5, finetune_fraction=0.2, size_increment=8
    )
    for step in range(0, 1000, 7):
        expected = composer_side(step, 1000, 224, 0.5, 0.5, 0.2, 8)
        assert resizing.size_at(step, 1000, (224, 224)) == (expected, expected)
    assert resizing.size_at(0, 1000, (224, 160)) == (112, 80)
    assert math.isclose(resizing.ramp(850, 1000), 1.0)
