"""A NaN training loss stops the recipe (or skips the step) and never reaches weights or checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import quiet_trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.recipes import ImageClassifier, OptimizerConfig
from lightning_tricks.recipes.nonfinite import NonFiniteLossError

POISONED_STEP = 5


class PoisonedDigits(DigitsDataModule):
    """Digits whose training batch at ``POISONED_STEP`` carries a NaN pixel: bad input data."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        images, targets = super().on_after_batch_transfer(batch, dataloader_idx)
        if self.trainer.training and self.trainer.global_step == POISONED_STEP:
            images = images.clone()
            images[0, 0, 0, 0] = float("nan")
        return images, targets


class WeightsAcrossPoisonedStep(L.Callback):
    """The parameters just before and just after the poisoned batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == POISONED_STEP:
            self.before = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == POISONED_STEP:
            self.after = [p.detach().clone() for p in pl_module.parameters()]


def _fit(tmp_path, on_nonfinite_loss: str, lr: float = 0.05) -> tuple[ImageClassifier, L.Trainer]:
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(
        "small_cnn",
        num_classes=10,
        in_channels=1,
        optimizer=OptimizerConfig(name="sgd", lr=lr, momentum=0.9),
        on_nonfinite_loss=on_nonfinite_loss,
    )
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    kwargs = {**quiet_trainer_kwargs(tmp_path), "enable_checkpointing": True}
    trainer = L.Trainer(max_steps=8, callbacks=[checkpoints, WeightsAcrossPoisonedStep()], **kwargs)
    trainer.fit(model, datamodule=PoisonedDigits(batch_size=32))
    return model, trainer


def test_nan_loss_stops_the_recipe_and_the_last_checkpoint_stays_good(tmp_path):
    with pytest.raises(NonFiniteLossError) as failure:
        _fit(tmp_path, "stop")
    message = str(failure.value)
    assert f"Non-finite training loss nan at step {POISONED_STEP} (epoch 0, batch {POISONED_STEP})" in message
    assert "last finite loss was" in message and f"at step {POISONED_STEP - 1}" in message
    assert "bad input data" in message

    saved = sorted((tmp_path / "ckpt").glob("*.ckpt"))
    assert [p.name for p in saved] == ["epoch=0-step=2.ckpt", "epoch=0-step=4.ckpt"]
    last = torch.load(saved[-1], weights_only=True)
    assert last["global_step"] == 4
    tensors = [v for v in last["state_dict"].values() if v.is_floating_point()]
    tensors += [
        v
        for state in last["optimizer_states"][0]["state"].values()
        for v in state.values()
        if torch.is_tensor(v) and v.is_floating_point()
    ]
    assert tensors and all(torch.isfinite(t).all() for t in tensors)


def test_skip_option_drops_only_the_bad_step(tmp_path):
    with pytest.warns(UserWarning, match=rf"loss nan at step {POISONED_STEP} .*Skipped this step"):
        model, trainer = _fit(tmp_path, "skip")
    assert model.nonfinite_guard.skipped_steps == [POISONED_STEP]
    # Lightning still counts the skipped batch as a step, but no gradient existed to change a weight.
    watch = next(c for c in trainer.callbacks if isinstance(c, WeightsAcrossPoisonedStep))
    assert all(torch.equal(a, b) for a, b in zip(watch.before, watch.after, strict=True))
    assert trainer.global_step == 8
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_exploding_learning_rate_is_named_as_the_likely_cause(tmp_path):
    L.seed_everything(0, verbose=False)
    model = ImageClassifier(
        "linear",
        num_classes=10,
        in_channels=1,
        model_kwargs={"input_size": 8},
        optimizer=OptimizerConfig(name="sgd", lr=1e38),  # one step overflows the logits
    )
    trainer = L.Trainer(max_steps=5, **quiet_trainer_kwargs(tmp_path))
    with pytest.raises(
        NonFiniteLossError, match=r"inputs are finite, so most likely the learning rate is too high"
    ):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))


def test_unknown_action_is_refused():
    with pytest.raises(
        ValueError, match=r"on_nonfinite_loss must be one of \('stop', 'skip'\), got 'ignore'"
    ):
        ImageClassifier("small_cnn", num_classes=10, in_channels=1, on_nonfinite_loss="ignore")
