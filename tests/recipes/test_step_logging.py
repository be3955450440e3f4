"""The recipe's cheap per-step path: step values on logging steps, exact epoch means, bounded NaN stop."""

from __future__ import annotations

import csv

import lightning as L
import pytest
import torch
from helpers import logging_trainer_kwargs, quiet_trainer_kwargs
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.recipes import ImageClassifier, OptimizerConfig, RegularizationConfig
from lightning_tricks.recipes.nonfinite import NonFiniteLossError

BATCHES, LAST_BATCH, LOG_EVERY = 7, 5, 3  # the last batch is smaller: the epoch mean is batch-weighted


class StepRecorder(L.Callback):
    """Every step's returned loss, its batch's correct count and size, per epoch."""

    def __init__(self) -> None:
        self.steps: list[tuple[int, int, float, int, int]] = []  # (step, epoch, loss, correct, size)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the weights have changed since the loss: the correct count comes from the step's own forward
        step = (trainer.global_step - 1, trainer.current_epoch)
        self.steps.append((*step, float(outputs["loss"]), pl_module.last_correct, len(batch[1])))


class RecordingClassifier(ImageClassifier):
    """Keeps the number of correct predictions of the weights each training step saw."""

    def training_step(self, batch, batch_idx):
        images, targets = batch
        with torch.no_grad():
            self.last_correct = int((self(images).argmax(1) == targets).sum())
        return super().training_step(batch, batch_idx)


def _loader() -> DataLoader:
    generator = torch.Generator().manual_seed(0)
    size = (BATCHES - 1) * 16 + LAST_BATCH
    images = torch.randn(size, 1, 8, 8, generator=generator)
    targets = torch.randint(10, (size,), generator=generator)
    return DataLoader(TensorDataset(images, targets), batch_size=16)


def test_step_values_on_logging_steps_and_exact_batch_weighted_epoch_means(tmp_path):
    torch.manual_seed(0)
    model = RecordingClassifier(
        "mlp",
        num_classes=10,
        in_channels=1,
        model_kwargs={"input_size": 8},
        optimizer=OptimizerConfig(name="sgd", lr=0.1),
        regularization=RegularizationConfig(l2=1e-3),
    )
    recorder = StepRecorder()
    trainer = L.Trainer(max_epochs=2, callbacks=[recorder], **logging_trainer_kwargs(tmp_path, LOG_EVERY))
    trainer.fit(model, train_dataloaders=_loader())

    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    step_rows = {int(r["step"]): float(r["train/loss_step"]) for r in rows if r.get("train/loss_step")}
    # Lightning writes steps whose count of stepped batches is a multiple of log_every_n_steps
    expected_steps = {s: loss for s, _, loss, _, _ in recorder.steps if (s + 1) % LOG_EVERY == 0}
    assert step_rows.keys() == expected_steps.keys()
    for step, loss in expected_steps.items():
        assert step_rows[step] == pytest.approx(loss, rel=1e-6)
    penalty_rows = [r for r in rows if r.get("train/penalty_step")]
    assert len(penalty_rows) == len(expected_steps)

    epoch_rows = [r for r in rows if r.get("train/loss_epoch")]
    assert len(epoch_rows) == 2
    for epoch, row in enumerate(epoch_rows):
        steps = [(loss, correct, size) for _, e, loss, correct, size in recorder.steps if e == epoch]
        total = sum(size for _, _, size in steps)
        mean_loss = sum(loss * size for loss, _, size in steps) / total
        assert float(row["train/loss_epoch"]) == pytest.approx(mean_loss, rel=1e-5)
        assert float(row["train/acc"]) == pytest.approx(sum(c for _, c, _ in steps) / total, rel=1e-6)
        assert "train/loss" not in row or not row["train/loss"]  # the plain name is for callbacks only
    last_epoch = [(loss, size) for _, e, loss, _, size in recorder.steps if e == 1]
    assert trainer.callback_metrics["train/loss"].item() == pytest.approx(
        sum(loss * size for loss, size in last_epoch) / sum(size for _, size in last_epoch), rel=1e-5
    )


class LastStepSeen(L.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step


def test_stop_on_nan_fires_at_the_next_logging_step_and_names_the_bad_step(tmp_path):
    poisoned = 4

    class Poisoned(ImageClassifier):
        def training_step(self, batch, batch_idx):
            images, targets = batch
            if self.trainer.global_step == poisoned:
                images = images.clone()
                images[0, 0, 0, 0] = float("nan")
            return super().training_step((images, targets), batch_idx)

    torch.manual_seed(0)
    model = Poisoned("mlp", num_classes=10, in_channels=1, model_kwargs={"input_size": 8})
    seen = LastStepSeen()
    trainer = L.Trainer(
        max_epochs=1, log_every_n_steps=LOG_EVERY, callbacks=[seen], **quiet_trainer_kwargs(tmp_path)
    )
    with pytest.raises(
        NonFiniteLossError, match=rf"loss nan at step {poisoned} \(epoch 0, batch {poisoned}\)"
    ):
        trainer.fit(model, train_dataloaders=_loader())
    # read back at the first logging step after the bad one: step 5 ((5 + 1) % 3 == 0), not later
    assert seen.step == 5


@pytest.mark.filterwarnings("ignore:The ``compute`` method:UserWarning")  # no update: restored sums
def test_old_checkpoints_running_accuracy_is_read_from_stat_scores():
    model = ImageClassifier("mlp", num_classes=3, in_channels=1, model_kwargs={"input_size": 8})
    tp, fn = torch.tensor([4, 1, 2]), torch.tensor([1, 0, 3])  # micro: 7 correct of 11
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("train_acc.")}
    state.update({"train_acc.tp": tp, "train_acc.fp": fn.flip(0), "train_acc.tn": tp + 5, "train_acc.fn": fn})
    checkpoint = {"state_dict": state}
    model.on_load_checkpoint(checkpoint)
    model.load_state_dict(checkpoint["state_dict"])
    assert model.train_acc.compute().item() == pytest.approx(7 / 11)
