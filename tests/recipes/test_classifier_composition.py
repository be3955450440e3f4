"""ImageClassifier with Lightning's own callbacks: batch-size finder, accumulation schedule, finetuning."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import (
    BackboneFinetuning,
    BatchSizeFinder,
    Callback,
    GradientAccumulationScheduler,
)

from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.recipes import ImageClassifier, OptimizerConfig, SchedulerConfig

BASE_LR, BASE_BATCH = 0.1, 64


class LRRecorder(Callback):
    """Per optimizer step: epoch, lr, per-device batch size and accumulation in force."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, float, int, int]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        batch = trainer.datamodule.batch_size
        row = (trainer.current_epoch, optimizer.param_groups[0]["lr"], batch, trainer.accumulate_grad_batches)
        self.rows.append(row)


def trainer_kwargs(tmp_path, **kwargs) -> dict:
    return dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        default_root_dir=tmp_path,
        **kwargs,
    )


def make_model(scheduler: SchedulerConfig | None = None) -> ImageClassifier:
    return ImageClassifier(
        "mlp",
        num_classes=10,
        in_channels=1,
        model_kwargs={"input_size": 8},
        optimizer=OptimizerConfig(name="sgd", lr=BASE_LR, base_batch_size=BASE_BATCH),
        scheduler=scheduler,
    )


def test_linear_scaling_rule_follows_gradient_accumulation_schedule(tmp_path):
    epochs = 3
    recorder = LRRecorder()
    trainer = L.Trainer(
        max_epochs=epochs,
        limit_train_batches=8,
        callbacks=[GradientAccumulationScheduler({0: 1, 1: 4}), recorder],
        **trainer_kwargs(tmp_path),
    )
    trainer.fit(make_model(SchedulerConfig("cosine", interval="epoch")), DigitsDataModule(batch_size=16))
    assert {(e, acc) for e, _, _, acc in recorder.rows} == {(0, 1), (1, 4), (2, 4)}
    for epoch, lr, batch, accumulation in recorder.rows:
        rule = BASE_LR * batch * accumulation / BASE_BATCH  # Goyal et al.: lr x global batch / base batch
        cosine = (1 + math.cos(math.pi * epoch / epochs)) / 2
        assert lr == pytest.approx(rule * cosine, rel=1e-12)


def test_linear_scaling_rule_follows_batch_size_finder(tmp_path):
    recorder = LRRecorder()
    finder = BatchSizeFinder(mode="power", init_val=16, max_trials=2, steps_per_trial=1)
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=3, callbacks=[finder, recorder], **trainer_kwargs(tmp_path)
    )
    dm = DigitsDataModule(batch_size=16)
    trainer.fit(make_model(SchedulerConfig(warmup=2, interval="step", warmup_start_factor=0.5)), dm)
    assert dm.batch_size == finder.optimal_batch_size == 32
    assert len(recorder.rows) == 6 and {b for _, _, b, _ in recorder.rows} == {32}
    rule = BASE_LR * 32 / BASE_BATCH
    warmup = [0.5, 0.75, 1.0, 1.0, 1.0, 1.0]  # linear from 0.5 to 1 over 2 steps, then constant
    assert [lr for _, lr, _, _ in recorder.rows] == pytest.approx([rule * f for f in warmup], rel=1e-12)


class WeightsPerEpoch(Callback):
    def __init__(self) -> None:
        self.states = []

    def on_train_epoch_end(self, trainer, pl_module):
        self.states.append({k: v.detach().clone() for k, v in pl_module.net.state_dict().items()})


def test_lightning_backbone_finetuning_trains_the_head_first_then_the_backbone(tmp_path):
    model = ImageClassifier("small_cnn", num_classes=10, in_channels=1, optimizer=OptimizerConfig(lr=0.05))
    head = {id(p) for p in model.head.parameters()}
    head_names = {n for n, p in model.net.named_parameters() if id(p) in head}
    assert head_names == {"classifier.weight", "classifier.bias"}
    backbone = {id(p) for p in model.backbone.parameters()}
    assert backbone | head == {id(p) for p in model.parameters()} and not backbone & head
    # Lightning's train_bn=True (default) keeps BatchNorm trainable while the rest of the backbone is frozen
    norms = [m for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    norm_ids = {id(p) for m in norms for p in m.parameters()}
    norm_names = {n for n, p in model.net.named_parameters() if id(p) in norm_ids}
    assert norm_names

    initial = {k: v.clone() for k, v in model.net.state_dict().items()}
    weights = WeightsPerEpoch()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, backbone_initial_ratio_lr=0.1)
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=3, callbacks=[finetuning, weights], **trainer_kwargs(tmp_path)
    )
    trainer.fit(model, DigitsDataModule(batch_size=32, image_size=16))
    after_head_only, after_all = weights.states
    for name, _ in model.net.named_parameters():
        changed_first = not torch.equal(initial[name], after_head_only[name])
        assert changed_first == (name in head_names | norm_names), name  # epoch 0: head (and norms)
        assert not torch.equal(after_head_only[name], after_all[name]), name  # epoch 1: everything
    backbone_group = trainer.optimizers[0].param_groups[-1]
    assert {id(p) for p in backbone_group["params"]} == backbone - norm_ids
    assert backbone_group["lr"] == pytest.approx(0.1 * 0.05)  # Lightning's initial backbone ratio
    assert checkpoint_keys_unique(model)


def checkpoint_keys_unique(model: ImageClassifier) -> bool:
    """The backbone view is not registered: every weight appears once in the state_dict, under ``net.``."""
    keys = [k for k in model.state_dict() if not k.startswith(("train_", "val_", "test_"))]
    return all(k.startswith("net.") for k in keys)
