"""Every public callback on a LightningModule written here from scratch, in the shapes users write.

Scenarios: (a) own metric names and plain DataLoaders; (b) dict batches and a dict-returning
training_step; (c) a forward returning a tuple; (d) manual optimization; (e) two optimizers (manual,
as Lightning requires); (f) bf16-mixed on CPU; (g) a torch.compile'd model. Each pair either works,
checked against a value computed here, or is refused before any training step with a message
saying why.
"""

from __future__ import annotations

import copy
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.callbacks import (
    EMA,
    InitLossCheck,
    LRFinder,
    MomentumSchedule,
    OptimizerSwitch,
    OverfitTinyBatch,
    SmoothedEarlyStopping,
    SnapshotEnsemble,
    TrainingDiagnostics,
)
from tests.helpers import quiet_trainer_kwargs

BATCH, SAMPLES, FEATURES, CLASSES = 16, 64, 8, 4
STEPS_PER_EPOCH = SAMPLES // BATCH

SCENARIOS = {
    "a_own_names": {},
    "b_dict_batches": {"batch": "dict", "step_output": "dict"},
    "c_tuple_forward": {"forward_output": "tuple"},
    "d_manual": {"manual": True},
    "e_two_optimizers": {"manual": True, "optimizers": 2},
    "f_bf16": {"precision": "bf16-mixed"},
}


class UserNet(L.LightningModule):
    """A user's classifier: logs ``train_loss``, ``val_loss``, ``val_acc``; shapes set by arguments."""

    def __init__(
        self,
        batch: str = "tuple",
        step_output: str = "loss",
        forward_output: str = "logits",
        manual: bool = False,
        optimizers: int = 1,
        restarts: bool = False,
        lr: float = 0.01,
        val_acc_script: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["val_acc_script"])
        self.val_acc_script = val_acc_script
        self.automatic_optimization = not manual
        self.body = nn.Sequential(nn.Linear(FEATURES, 16), nn.ReLU())
        self.head = nn.Linear(16, CLASSES)
        self.steps_run = 0

    def forward(self, x):
        features = self.body(x)
        logits = self.head(features)
        return (logits, features) if self.hparams.forward_output == "tuple" else logits

    def _loss_acc(self, batch):
        x, y = (batch["image"], batch["label"]) if self.hparams.batch == "dict" else batch
        out = self(x)
        logits = out[0] if isinstance(out, tuple) else out
        return F.cross_entropy(logits, y), (logits.argmax(1) == y).float().mean()

    def training_step(self, batch, batch_idx):
        self.steps_run += 1
        loss, _ = self._loss_acc(batch)
        self.log("train_loss", loss)
        if self.automatic_optimization:
            return {"loss": loss} if self.hparams.step_output == "dict" else loss
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(loss)
        for optimizer in optimizers:
            optimizer.step()
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        return None

    def validation_step(self, batch, batch_idx):
        loss, acc = self._loss_acc(batch)
        if self.val_acc_script is not None:
            acc = torch.tensor(self.val_acc_script[self.current_epoch])
        self.log("val_loss", loss)
        self.log("val_acc", acc)

    def configure_optimizers(self):
        lr = self.hparams.lr
        if self.hparams.optimizers == 2:
            return [
                torch.optim.Adam(self.body.parameters(), lr),
                torch.optim.Adam(self.head.parameters(), lr),
            ]
        optimizer = torch.optim.Adam(self.parameters(), lr)
        if not self.hparams.restarts:
            return optimizer
        restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=STEPS_PER_EPOCH)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": restarts, "interval": "step"}}


def tensors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    y = (x[:, :CLASSES] * 2).argmax(1)  # learnable labels
    return x, y


def loader(batch: str):
    x, y = tensors()
    data = (
        [{"image": a, "label": b} for a, b in zip(x, y, strict=True)]
        if batch == "dict"
        else TensorDataset(x, y)
    )
    return DataLoader(data, batch_size=BATCH)  # no shuffling: the test knows every batch


def initial_loss(model: UserNet, num_batches: int) -> float:
    """Cross-entropy of the untrained model on the first training batches, computed independently."""
    x, y = tensors()
    n = num_batches * BATCH
    with torch.no_grad():
        return float(F.cross_entropy(model.head(model.body(x[:n])), y[:n]))


class StepWeights(L.Callback):
    """Weights after every optimizer step, and before the first training step."""

    def __init__(self):
        self.after_steps, self.first, self.last_step = [], None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is None:
            self.first = copy.deepcopy(pl_module.state_dict())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.last_step:
            self.last_step = trainer.global_step
            self.after_steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def expected_ema(after_steps, decay: float) -> dict:
    """The first update copies the weights (torch's AveragedModel convention), then the average decays."""
    expected = {k: v.float() for k, v in after_steps[0].items()}
    for weights in after_steps[1:]:
        for k in expected:
            expected[k] = decay * expected[k] + (1 - decay) * weights[k].float()
    return expected


class EpochMomentum(L.Callback):
    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.seen.append([g["betas"][0] for opt in trainer.optimizers for g in opt.param_groups])


def fit(tmp_path, scenario: str, callbacks, max_epochs=2, compiled=False, net=None, **module_kwargs):
    options = dict(SCENARIOS[scenario])
    precision = options.pop("precision", "32-true")
    torch.manual_seed(0)
    model = (net or UserNet)(**options, **module_kwargs)
    initial = copy.deepcopy(model)
    if compiled:
        model = torch.compile(model)
    trainer = L.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        precision=precision,
        num_sanity_val_steps=0,
        **quiet_trainer_kwargs(tmp_path),
    )
    batch = options.get("batch", "tuple")
    trainer.fit(model, loader(batch), loader(batch))
    return trainer, model, initial


def refused(tmp_path, scenario, callback, match, **fit_kwargs):
    """Assert ``fit`` raises ``ValueError(match)`` before any training batch."""
    steps = StepWeights()
    with pytest.raises(ValueError, match=match) as error:
        fit(tmp_path, scenario, [callback, steps], **fit_kwargs)
    assert steps.first is None  # no training step ran
    return error


ALL = list(SCENARIOS)
AUTOMATIC = [s for s in ALL if not SCENARIOS[s].get("manual")]
ONE_OPTIMIZER = [s for s in ALL if SCENARIOS[s].get("optimizers", 1) == 1]
TOLERANCE = {"f_bf16": 3e-2}


@pytest.mark.parametrize("scenario", ALL)
def test_ema_equals_an_average_computed_here(tmp_path, scenario):
    decay = 0.5
    ema = EMA(decay=decay, warmup=None, validate=False, copy_average_at_end=False)
    steps = StepWeights()
    _, model, _ = fit(tmp_path, scenario, [steps, ema])
    expected = expected_ema(steps.after_steps, decay)
    averaged = ema.ema_state_dict()
    assert len(steps.after_steps) == ema.num_updates == 2 * STEPS_PER_EPOCH
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k].float(), v)
    assert any(not torch.equal(averaged[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("scenario", ONE_OPTIMIZER)
def test_snapshot_ensemble_snapshots_at_the_restarts(tmp_path, scenario):
    snapshots = SnapshotEnsemble(cycles=2, dirpath=str(tmp_path / "snapshots"))
    trainer, _, _ = fit(tmp_path, scenario, [snapshots], restarts=True)
    # T_0 = one epoch of optimizer steps: the cycles end after each epoch's last step
    assert [s.step for s in snapshots._snapshots] == [STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH]
    assert "val_acc_ensemble" in trainer.callback_metrics


def test_snapshot_ensemble_refuses_two_optimizers(tmp_path):
    snapshots = SnapshotEnsemble(cycles=2, dirpath=str(tmp_path / "snapshots"))
    refused(
        tmp_path, "e_two_optimizers", snapshots, "SnapshotEnsemble needs exactly one optimizer.*returned 2"
    )


class Regressor(UserNet):
    """Not a classifier: one output per sample, trained with the squared error."""

    def forward(self, x):
        return self.head(self.body(x))[:, 0]

    def _loss_acc(self, batch):
        x, y = batch
        loss = F.mse_loss(self(x), y.float())
        return loss, -loss


def test_snapshot_ensemble_refuses_a_model_that_is_not_a_classifier(tmp_path):
    snapshots = SnapshotEnsemble(cycles=2, dirpath=str(tmp_path / "snapshots"))
    error = refused(
        tmp_path,
        "a_own_names",
        snapshots,
        "SnapshotEnsemble needs a classifier",
        net=Regressor,
        restarts=True,
    )
    assert "shape (16,)" in str(error.value) and "logits_of" in str(error.value)


@pytest.mark.parametrize("scenario", AUTOMATIC)
def test_lr_finder_applies_its_suggestion(tmp_path, scenario):
    finder = LRFinder(num_steps=12, min_lr=1e-4, max_lr=1.0, plot=False, min_loss_drop=0.0)
    steps = StepWeights()
    trainer, model, _ = fit(tmp_path, scenario, [finder, steps], max_epochs=1)
    assert finder.results is not None and finder.results.lr is not None
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(finder.results.lr)
    assert model.hparams.lr == pytest.approx(finder.results.lr)
    assert model.steps_run == 12 + STEPS_PER_EPOCH  # the search's steps, then the real epoch


@pytest.mark.parametrize("scenario", ["d_manual", "e_two_optimizers"])
def test_lr_finder_refuses_manual_optimization(tmp_path, scenario):
    error = refused(tmp_path, scenario, LRFinder(plot=False), "LRFinder needs automatic optimization")
    assert "automatic_optimization = False" in str(error.value)


@pytest.mark.parametrize("scenario", ALL)
def test_early_stopping_stops_at_the_epoch_computed_here(tmp_path, scenario):
    script, patience = [0.5, 0.9, 0.8, 0.85, 0.7, 0.6], 2
    stop = next(e for e in range(len(script)) if e - max(range(e + 1), key=script.__getitem__) >= patience)
    es = SmoothedEarlyStopping(monitor="val_acc", smoothing=None, patience=patience)
    trainer, _, _ = fit(tmp_path, scenario, [es], max_epochs=len(script), val_acc_script=script)
    assert es.stopped_epoch == stop == 3
    assert trainer.current_epoch == stop + 1


@pytest.mark.parametrize("scenario", ALL)
def test_init_loss_check_measures_the_loss_computed_here(tmp_path, scenario):
    check = InitLossCheck(num_batches=2, on_fail="raise")
    _, _, initial = fit(tmp_path, scenario, [check], max_epochs=1)
    assert check.skip_reason is None and check.passed
    assert check.measured == pytest.approx(initial_loss(initial, 2), rel=TOLERANCE.get(scenario, 1e-5))
    assert check.expected == pytest.approx(math.log(CLASSES))


class OwnKeys(UserNet):
    """Dict batches under keys no default knows; the module says where inputs and targets are."""

    def split_batch(self, batch):
        return batch["pixels"], batch["cls"]

    def _loss_acc(self, batch):
        return super()._loss_acc(self.split_batch(batch))


def test_init_loss_check_uses_the_module_split_batch_hook(tmp_path):
    x, y = tensors()
    data = DataLoader([{"pixels": a, "cls": b} for a, b in zip(x, y, strict=True)], batch_size=BATCH)
    torch.manual_seed(0)
    model = OwnKeys()
    expected = initial_loss(model, 2)
    check = InitLossCheck(num_batches=2, on_fail="raise")
    L.Trainer(max_epochs=1, callbacks=[check], **quiet_trainer_kwargs(tmp_path)).fit(model, data)
    assert check.skip_reason is None and check.measured == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("scenario", ALL)
def test_overfit_tiny_batch_fits_and_leaves_the_weights(tmp_path, scenario):
    check = OverfitTinyBatch(num_samples=8, max_steps=150, on_fail="raise")
    steps = StepWeights()
    _, _, initial = fit(tmp_path, scenario, [check, steps], max_epochs=1)
    assert check.passed and check.final_accuracy == 1.0
    for k, v in initial.state_dict().items():  # the real run starts from the untouched weights
        assert torch.equal(steps.first[k], v)


@pytest.mark.parametrize("scenario", ALL)
def test_diagnostics_probe_measures_the_loss_computed_here(tmp_path, scenario):
    diagnostics = TrainingDiagnostics()
    _, _, initial = fit(tmp_path, scenario, [diagnostics], max_epochs=1)
    expected = initial_loss(initial, 1)
    assert diagnostics.init["initial_loss"] == pytest.approx(expected, rel=TOLERANCE.get(scenario, 1e-5))
    assert diagnostics.init["num_classes"] == CLASSES


class ValLosses(L.Callback):
    def __init__(self):
        self.values = []

    def on_validation_epoch_end(self, trainer, pl_module):
        self.values.append(float(trainer.callback_metrics["val_loss"]))


def test_diagnostics_read_val_loss_beside_the_twins_other_callbacks_log(tmp_path):
    """EMA and SnapshotEnsemble log ``val_loss_ema``/``val_loss_ensemble``: ``val_loss`` is still the one."""
    diagnostics, recorded = TrainingDiagnostics(), ValLosses()
    ema = EMA(decay=0.5, warmup=None)
    snapshots = SnapshotEnsemble(cycles=1, dirpath=str(tmp_path / "snapshots"))
    fit(tmp_path, "a_own_names", [ema, snapshots, recorded, diagnostics], restarts=True)
    assert diagnostics.val_losses == pytest.approx(recorded.values) and len(recorded.values) == 2


@pytest.mark.parametrize("scenario", ALL)
def test_momentum_schedule_sets_the_ramp_computed_here(tmp_path, scenario):
    start, end, ramp = 0.8, 0.9, 2
    seen = EpochMomentum()
    fit(tmp_path, scenario, [MomentumSchedule(start, end, ramp), seen], max_epochs=2)
    expected = [start + (end - start) * min(e / ramp, 1.0) for e in range(2)]
    assert len(seen.seen) == len(expected)
    for values, value in zip(seen.seen, expected, strict=True):  # every group of every optimizer
        assert values == pytest.approx([value] * len(values))


class SteppedOptimizers(L.Callback):
    """The type of every optimizer that steps, per epoch (manual optimization included)."""

    def __init__(self):
        self.types = []

    def on_train_epoch_start(self, trainer, pl_module):
        self.types.append(set())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.types[-1].add(type(optimizer).__name__)


@pytest.mark.parametrize("scenario", ONE_OPTIMIZER)
def test_optimizer_switch_steps_sgd_after_the_switch(tmp_path, scenario):
    stepped = SteppedOptimizers()
    fit(tmp_path, scenario, [OptimizerSwitch(switch_epoch=1, sgd_lr=0.1), stepped], max_epochs=3)
    assert stepped.types == [{"Adam"}, {"SGD"}, {"SGD"}]


def test_optimizer_switch_refuses_two_optimizers(tmp_path):
    refused(
        tmp_path,
        "e_two_optimizers",
        OptimizerSwitch(switch_epoch=1),
        "OptimizerSwitch needs exactly one optimizer",
    )


@pytest.mark.slow
def test_compiled_model_with_ema_and_init_loss_check(tmp_path):
    """(g): a ``torch.compile``d module; Lightning unwraps it and keeps the compiled forward."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported on this Python/platform")
    check = InitLossCheck(num_batches=2, on_fail="raise")
    ema = EMA(decay=0.5, warmup=None, validate=False, copy_average_at_end=False)
    steps = StepWeights()
    _, _, initial = fit(tmp_path, "a_own_names", [check, steps, ema], max_epochs=1, compiled=True)
    assert check.measured == pytest.approx(initial_loss(initial, 2), rel=1e-4)
    expected = expected_ema(steps.after_steps, 0.5)
    averaged = ema.ema_state_dict()
    for k, v in expected.items():
        torch.testing.assert_close(averaged[k].float(), v)


class TrainOnly(L.LightningModule):
    """A module that only trains: no ``validation_step`` at all."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(FEATURES, CLASSES)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self.net(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), 0.01)


VALIDATION_OFF = {  # how a user's run ends up never validating: (module, with val loader, Trainer kwargs)
    "limit_val_batches=0": (UserNet, True, {"limit_val_batches": 0}),
    "no val loader": (UserNet, False, {}),
    "no validation_step": (TrainOnly, True, {}),
}
VALIDATION_MONITORS = {
    "early_stopping": lambda: SmoothedEarlyStopping(monitor="val_loss", patience=2),
    "optimizer_switch": lambda: OptimizerSwitch(monitor="val_loss", sgd_lr=0.1),
    # the plateau rule runs after each validation, whatever the metric
    "optimizer_switch_on_train_loss": lambda: OptimizerSwitch(monitor="train_loss", sgd_lr=0.1),
}


@pytest.mark.parametrize("callback", list(VALIDATION_MONITORS))
@pytest.mark.parametrize("setup", list(VALIDATION_OFF))
def test_validation_monitor_in_a_run_without_validation_is_refused_before_training(tmp_path, setup, callback):
    """Lightning would report it after the first epoch as a name to fix ("did you mean `train_loss`?"),
    or, for the plateau switch, never switch at all."""
    net, with_val, trainer_kwargs = VALIDATION_OFF[setup]
    torch.manual_seed(0)
    model = net()
    initial = copy.deepcopy(model.state_dict())
    steps = StepWeights()
    trainer = L.Trainer(
        max_epochs=2,
        callbacks=[VALIDATION_MONITORS[callback](), steps],
        **trainer_kwargs,
        **quiet_trainer_kwargs(tmp_path),
    )
    with pytest.raises(ValueError, match=r"monitor=?'(val|train)_loss'.*never validates") as error:
        trainer.fit(model, loader("tuple"), loader("tuple") if with_val else None)
    assert steps.first is None  # no training step ran
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())
    assert "did you mean" not in str(error.value).lower()


def test_early_stopping_on_a_training_metric_needs_no_validation(tmp_path):
    es = SmoothedEarlyStopping(monitor="train_loss", smoothing=None, patience=5)
    trainer = L.Trainer(max_epochs=2, callbacks=[es], limit_val_batches=0, **quiet_trainer_kwargs(tmp_path))
    trainer.fit(UserNet(), loader("tuple"))
    assert trainer.current_epoch == 2 and es.wait_count <= 1
    assert float(trainer.callback_metrics["train_loss_smoothed"]) == float(
        trainer.callback_metrics["train_loss"]
    )


def test_early_stopping_without_validation_and_strict_false_warns_and_trains(tmp_path):
    es = SmoothedEarlyStopping(monitor="val_loss", strict=False)
    trainer = L.Trainer(max_epochs=1, callbacks=[es], **quiet_trainer_kwargs(tmp_path))
    with pytest.warns(RuntimeWarning, match="never validates.*never stops early"):
        trainer.fit(TrainOnly(), loader("tuple"))
    assert trainer.global_step == STEPS_PER_EPOCH


class SilentValidation(UserNet):
    """Validates but logs nothing there (e.g. a forgotten ``self.log``)."""

    def validation_step(self, batch, batch_idx):
        self._loss_acc(batch)


def test_unlogged_validation_metric_is_not_matched_to_a_training_metric(tmp_path):
    es = SmoothedEarlyStopping(monitor="val_loss")
    trainer = L.Trainer(max_epochs=2, callbacks=[es], **quiet_trainer_kwargs(tmp_path))
    with pytest.raises(RuntimeError, match=r"`val_loss` which is not available") as error:
        trainer.fit(SilentValidation(), loader("tuple"), loader("tuple"))
    assert "Did you mean `train_loss`" not in str(error.value)
    assert "does `validation_step` call `self.log('val_loss', ...)`" in str(error.value)


class Tested(UserNet):
    def test_step(self, batch, batch_idx):
        self.log("test_acc", self._loss_acc(batch)[1])


@pytest.mark.parametrize("entry", ["test", "validate"])
def test_snapshot_ensemble_without_snapshots_says_why_evaluation_logs_no_ensemble(tmp_path, entry):
    """A fresh callback in an evaluation-only Trainer (no fit, no ckpt_path) has nothing to average."""
    snapshots = SnapshotEnsemble(cycles=2, dirpath=str(tmp_path / "snapshots"))
    trainer = L.Trainer(callbacks=[snapshots], **quiet_trainer_kwargs(tmp_path))
    with pytest.warns(
        UserWarning, match=f"no snapshots, so `trainer.{entry}` logs no `_ensemble`.*ckpt_path="
    ):
        (metrics,) = getattr(trainer, entry)(Tested(), loader("tuple"), verbose=False)
    assert not any("ensemble" in name for name in metrics)


class DigitsUserNet(L.LightningModule):
    """A user's digits classifier with BatchNorm, Adam and warm restarts every 4 optimizer steps."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
        )

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        loss = F.cross_entropy(self(batch[0]), batch[1])
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        logits = self(batch[0])
        self.log("val_loss", F.cross_entropy(logits, batch[1]))
        self.log("val_acc", (logits.argmax(1) == batch[1]).float().mean())

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.parameters(), 0.01)
        restarts = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=4)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": restarts, "interval": "step"}}


def test_mid_epoch_resume_with_the_callbacks_together_continues_as_if_never_stopped(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_tricks.datamodules import DigitsDataModule

    def run(root, ckpt_path=None):
        torch.manual_seed(0)
        callbacks = {
            "ema": EMA(decay=0.5, warmup=None),
            "stop": SmoothedEarlyStopping(monitor="val_acc", patience=5),
            "diagnostics": TrainingDiagnostics(check_init=False),
            "momentum": MomentumSchedule(0.85, 0.95, ramp_epochs=2),
            "snapshots": SnapshotEnsemble(cycles=2, dirpath=str(root / "snapshots")),
            "switch": OptimizerSwitch(switch_epoch=1, sgd_lr=0.05),
        }
        saver = ModelCheckpoint(
            dirpath=root / "ckpt", every_n_train_steps=6, save_top_k=-1, filename="{step}"
        )
        kwargs = {**quiet_trainer_kwargs(root), "enable_checkpointing": True}
        trainer = L.Trainer(
            max_epochs=2,
            limit_train_batches=4,
            limit_val_batches=2,
            callbacks=[*callbacks.values(), saver],
            **kwargs,
        )
        model = DigitsUserNet()
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=64), ckpt_path=ckpt_path)
        return trainer, model, callbacks

    full_trainer, full, full_cbs = run(tmp_path / "full")
    checkpoint = tmp_path / "full" / "ckpt" / "step=6.ckpt"  # mid-way through the second epoch
    trainer, resumed, cbs = run(tmp_path / "resumed", ckpt_path=checkpoint)
    assert trainer.global_step == full_trainer.global_step == 8
    torch.testing.assert_close(resumed.state_dict(), full.state_dict())
    torch.testing.assert_close(cbs["ema"].ema_state_dict(), full_cbs["ema"].ema_state_dict())
    assert cbs["diagnostics"].train_losses == pytest.approx(full_cbs["diagnostics"].train_losses)
    assert cbs["diagnostics"].eval_train_losses == pytest.approx(full_cbs["diagnostics"].eval_train_losses)
    assert float(cbs["stop"].best_score) == pytest.approx(float(full_cbs["stop"].best_score))
    assert [s.step for s in cbs["snapshots"]._snapshots] == [4, 8]
    for name in ("val_acc_ensemble", "val_acc_ema", "val_acc"):
        assert float(trainer.callback_metrics[name]) == pytest.approx(
            float(full_trainer.callback_metrics[name])
        )
    assert type(trainer.optimizers[0]).__name__ == "SGD"


class AdamWNet(UserNet):
    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), 0.01)  # torch's default weight_decay=0.01


def test_optimizer_switch_warns_before_training_that_adamw_decay_would_become_l2(tmp_path):
    steps = StepWeights()
    with pytest.warns(
        UserWarning, match=r"weight_decay \(0.01\).*AdamW's decoupled decay becomes SGD's coupled"
    ) as w:
        fit(tmp_path, "a_own_names", [OptimizerSwitch(switch_epoch=1, sgd_lr=0.1), steps], net=AdamWNet)
    assert len(steps.after_steps) == 2 * STEPS_PER_EPOCH
    assert sum("decoupled decay" in str(r.message) for r in w) == 1


def test_optimizer_switch_with_its_own_weight_decay_does_not_warn_about_adamw(tmp_path, recwarn):
    switch = OptimizerSwitch(switch_epoch=1, sgd_lr=0.1, weight_decay=5e-4)
    trainer, _, _ = fit(tmp_path, "a_own_names", [switch], net=AdamWNet)
    assert not any("decoupled decay" in str(r.message) for r in recwarn)
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] == 5e-4


def test_fast_dev_run_smoke_test_with_cycle_and_horizon_callbacks_runs_without_noise(tmp_path, recwarn):
    """``fast_dev_run`` (one batch) completes no snapshot cycle, reaches no switch epoch and is shorter than
    any EMA horizon: the smoke test runs, without refusals or warnings about its length."""
    snapshots = SnapshotEnsemble(cycles=2, dirpath=str(tmp_path / "snapshots"))
    ema = EMA(decay=0.999)
    switch = OptimizerSwitch(switch_epoch=5, sgd_lr=0.1)
    trainer = L.Trainer(
        fast_dev_run=True, callbacks=[snapshots, ema, switch], **quiet_trainer_kwargs(tmp_path)
    )
    trainer.fit(UserNet(restarts=True), loader("tuple"), loader("tuple"))
    assert trainer.global_step == 1 and ema.num_updates == 1 and not snapshots._snapshots
    noise = [
        str(w.message) for w in recwarn if any(s in str(w.message) for s in ("EMA(", "OptimizerSwitch("))
    ]
    assert noise == []


def test_snapshot_ensemble_says_how_many_cycles_the_run_completes(tmp_path):
    snapshots = SnapshotEnsemble(cycles=3, dirpath=str(tmp_path / "snapshots"))
    # T_0 = one epoch: two epochs complete two cycles
    refused(
        tmp_path,
        "a_own_names",
        snapshots,
        "completes only 2 cycles in 8 optimizer steps. Set `cycles` to at most 2",
        restarts=True,
    )


class DigitsMLP(DigitsUserNet):
    """A fixed input size: ``Flatten`` then ``Linear`` on the 8x8 digits."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))


class FirstBatch(L.Callback):
    def __init__(self):
        self.images = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.images is None:
            self.images = batch[0].clone()


def test_progressive_resizing_refuses_a_fixed_input_size_model_before_training(tmp_path):
    from lightning_tricks.callbacks import ProgressiveResizing
    from lightning_tricks.datamodules import DigitsDataModule

    torch.manual_seed(0)
    model = DigitsMLP()
    initial = copy.deepcopy(model.state_dict())
    steps = StepWeights()
    resizing = ProgressiveResizing(initial_scale=0.5, size_increment=2)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=2, callbacks=[resizing, steps], **quiet_trainer_kwargs(tmp_path)
    )
    with pytest.raises(
        ValueError, match=r"images of 4x4 at first, but DigitsMLP takes only 8x8 ones.*AdaptiveAvgPool2d"
    ):
        trainer.fit(model, datamodule=DigitsDataModule(batch_size=32))
    assert steps.first is None
    assert all(torch.equal(v, initial[k]) for k, v in model.state_dict().items())


def test_progressive_resizing_probe_leaves_the_data_order_and_augmentation_alone(tmp_path):
    """The probe draws a batch before training: the first training batch is the one a run without it sees."""
    from lightning_tricks.callbacks import ProgressiveResizing
    from lightning_tricks.datamodules import DigitsDataModule

    def first_batch(callbacks):
        L.seed_everything(0)
        seen = FirstBatch()
        trainer = L.Trainer(max_steps=1, callbacks=[*callbacks, seen], **quiet_trainer_kwargs(tmp_path))
        trainer.fit(DigitsUserNet(), datamodule=DigitsDataModule(batch_size=32, augment="flip"))
        return seen.images

    # initial_scale=1.0: nothing is resized, so the batches must match exactly
    torch.testing.assert_close(
        first_batch([ProgressiveResizing(initial_scale=1.0)]), first_batch([]), rtol=0, atol=0
    )
