"""TrainingDiagnostics: each detector on synthetic curves, and on real runs with good and bad init."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import (
    PlainClassifier,
    ddp_trainer_kwargs,
    digits_loaders,
    digits_tensors,
    quiet_trainer_kwargs,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn

from lightning_tricks.callbacks.detectors import (
    detect_explosion,
    detect_flat,
    detect_init_loss,
    detect_nonfinite,
    detect_overfitting,
    detect_underfitting,
    detect_variance_drift,
)
from lightning_tricks.callbacks.diagnostics import TrainingDiagnostics

HEALTHY = [2.3 * 0.95**i for i in range(60)]


# --------------------------------------------------------------------------------------------- pure detectors


def test_detect_nonfinite():
    assert detect_nonfinite(HEALTHY) is None
    curve = [*HEALTHY[:10], float("nan"), *HEALTHY[10:]]
    finding = detect_nonfinite(curve)
    assert finding.check == "nan" and finding.severity == "error"
    assert "nan at point 10" in finding.message and "learning rate" in finding.cause
    assert detect_nonfinite([1.0, float("inf")]).check == "nan"


def test_detect_explosion_uses_three_times_the_first_loss():
    assert detect_explosion(HEALTHY) is None
    assert detect_explosion([2.0, 1.5, 6.0]) is None  # exactly 3x is not "more than"
    finding = detect_explosion([2.0, 1.5, 6.1, 1.0])
    assert finding.check == "explosion" and "6.1" in finding.message and "too high" in finding.cause
    assert detect_explosion([2.0, 5.0], divergence_factor=2.0) is not None


def test_detect_flat():
    assert detect_flat(HEALTHY) is None
    flat = [2.30 + 0.01 * math.sin(i) for i in range(50)]
    finding = detect_flat(flat)
    assert finding.check == "flat" and "too low" in finding.cause
    start, end = sum(flat[:10]) / 10, sum(flat[-10:]) / 10
    assert f"{start:.4g}" in finding.message and f"{end:.4g}" in finding.message
    assert detect_flat([2.3, 2.3, 2.3]) is None  # too short to judge


def test_detect_overfitting():
    train = [2.0, 1.5, 1.0, 0.6, 0.3]
    assert detect_overfitting(train, [2.1, 1.7, 1.3, 1.1, 1.0]) is None
    finding = detect_overfitting(train, [2.1, 1.6, 1.2, 1.4, 1.6])
    assert finding.check == "overfitting" and "1.2 (evaluation 2) to 1.6" in finding.message
    assert detect_overfitting(train, [2.1, 1.6, 1.2, 1.4, 1.6], patience=3) is None
    assert detect_overfitting([2.0, 1.5, 1.0, 1.2, 1.4], [2.1, 1.6, 1.2, 1.4, 1.6]) is None  # train rises too


def test_detect_underfitting():
    assert detect_underfitting(0.3, 0.35, reference=2.3) is None
    assert detect_underfitting(1.8, 2.6, reference=2.3) is None  # large gap: not underfitting
    finding = detect_underfitting(1.8, 1.85, reference=2.3)
    assert finding.check == "underfitting" and "3% apart" in finding.message


def test_detect_init_loss():
    assert detect_init_loss(2.35, 10) is None
    high = detect_init_loss(9.0, 10)
    assert high.check == "init_loss" and "ln(10) = 2.3026" in high.message
    assert "far from uniform" in high.cause
    assert "beats chance" in detect_init_loss(0.5, 10).cause


def test_detect_variance_drift():
    assert detect_variance_drift([1.0, 1.3, 0.8, 1.1]) is None
    grows = detect_variance_drift([1.0, 100.0, 1e4], ["fc1", "fc2", "fc3"])
    assert grows.check == "activation_variance" and "grows 1e+04x from fc1" in grows.message
    assert "exploding" in grows.cause
    shrinks = detect_variance_drift([1.0, 1e-2, 1e-3], kind="gradient")
    assert (
        shrinks.check == "gradient_variance" and "shrinks" in shrinks.message and "vanishing" in shrinks.cause
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"divergence_factor": 1.0}, "divergence_factor"),
        ({"min_decrease": 0.0}, "min_decrease"),
        ({"overfit_patience": 0}, "overfit_patience"),
        ({"underfit_fraction": 1.5}, "underfit_fraction"),
        ({"variance_factor": 0.5}, "variance_factor"),
        ({"init_tolerance": 0.0}, "init_tolerance"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainingDiagnostics(**kwargs)


# --------------------------------------------------------------------------------------------- real runs


class DeepMLP(PlainClassifier):
    """Six Linear layers with He init and a small last layer; ``scale`` multiplies every weight."""

    def __init__(self, scale: float = 1.0, lr: float = 0.03):
        super().__init__(lr=lr)
        layers: list[nn.Module] = [nn.Flatten()]
        for i in range(5):
            layers += [nn.Linear(64, 64), nn.ReLU()]
            nn.init.kaiming_normal_(layers[-2].weight, nonlinearity="relu")
            nn.init.zeros_(layers[-2].bias)
            del i
        layers.append(nn.Linear(64, 10))
        layers[-1].weight.data.mul_(0.1)
        self.net = nn.Sequential(*layers)
        with torch.no_grad():
            for p in self.parameters():
                p.mul_(scale)


class TableLogger(Logger):
    """A logger that, like WandbLogger, accepts tables."""

    def __init__(self):
        super().__init__()
        self.tables = []

    name, version = "table", 0

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass

    def log_table(self, key, columns, data):
        self.tables.append((key, columns, data))


def fit(tmp_path, model, callbacks, max_epochs=3, n_train=512, logger=False, ckpt_path=None, lr=None):
    train, val = digits_loaders(batch_size=64, n_train=n_train)
    checkpointing = any(isinstance(c, ModelCheckpoint) for c in callbacks)
    kwargs = {**quiet_trainer_kwargs(tmp_path), "logger": logger, "enable_checkpointing": checkpointing}
    trainer = L.Trainer(**kwargs, max_epochs=max_epochs, callbacks=callbacks, num_sanity_val_steps=0)
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return trainer


def test_bad_init_is_flagged_with_the_measured_variances(tmp_path, capsys):
    L.seed_everything(0)
    model = DeepMLP(scale=10.0)
    reference = copy.deepcopy(model)
    diagnostics = TrainingDiagnostics()
    fit(tmp_path, model, [diagnostics], max_epochs=1, n_train=128)
    x, _ = digits_tensors(64)
    expected, h = [], x.flatten(1)
    for layer in reference.net[1:]:
        h = layer(h).detach()
        if isinstance(layer, nn.Linear):
            expected.append(float(h.var()))
    assert diagnostics.init["activation_var"] == pytest.approx(expected[:-1], rel=1e-4)  # hidden layers
    checks = {f.check for f in diagnostics.findings}
    assert {"activation_variance", "gradient_variance", "init_loss"} <= checks
    out = capsys.readouterr().out
    assert "Training diagnostics" in out and "activation_variance" in out


def test_healthy_run_flags_nothing_and_logs_the_table(tmp_path, capsys):
    L.seed_everything(0)
    diagnostics, logger = TrainingDiagnostics(), TableLogger()
    fit(tmp_path, DeepMLP(), [diagnostics], logger=logger, max_epochs=4)
    assert diagnostics.findings == []
    assert len(diagnostics.train_losses) == 32 and len(diagnostics.val_losses) == 4
    assert diagnostics.eval_train_losses[-1] < 0.6 * diagnostics.eval_train_losses[0]
    assert logger.tables == [
        (
            "diagnostics/findings",
            ["severity", "check", "message", "cause", "fix"],
            [["ok", "all", "no problems found", "", ""]],
        )
    ]
    assert "no problems found" in capsys.readouterr().out


def test_divergence_is_warned_during_training(tmp_path):
    L.seed_everything(0)
    diagnostics = TrainingDiagnostics(check_init=False)
    with pytest.warns(UserWarning, match="TrainingDiagnostics: the training loss"):
        fit(tmp_path, PlainClassifier(lr=20.0), [diagnostics], max_epochs=1)
    assert {"explosion"} <= {f.check for f in diagnostics.findings}


def test_resume_keeps_history_identical_to_an_uninterrupted_run(tmp_path):
    L.seed_everything(0)
    full = TrainingDiagnostics()
    fit(tmp_path / "full", DeepMLP(), [full], max_epochs=4, n_train=128)

    L.seed_everything(0)
    first = TrainingDiagnostics()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(tmp_path / "a", DeepMLP(), [first, ckpt], max_epochs=2, n_train=128)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["callbacks"][first.state_key]
    assert saved["train_losses"] == first.train_losses and len(saved["train_losses"]) == 4

    resumed = TrainingDiagnostics()
    fit(
        tmp_path / "b",
        DeepMLP(scale=3.0),
        [resumed],
        max_epochs=4,
        n_train=128,
        ckpt_path=ckpt.last_model_path,
    )
    assert resumed.train_losses == full.train_losses
    assert resumed.val_losses == full.val_losses
    assert resumed.init == full.init


def test_resume_from_a_mid_epoch_checkpoint_pairs_the_whole_epoch_with_its_validation(tmp_path):
    """The step losses since the last validation travel in the checkpoint: the resumed epoch's training
    loss is the mean over all its steps, not only those after the resume."""
    L.seed_everything(0)
    first = TrainingDiagnostics(check_init=False)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, filename="{step}")
    fit(tmp_path / "a", DeepMLP(), [first, ckpt], max_epochs=2, n_train=128)  # 2 steps an epoch

    resumed = TrainingDiagnostics(check_init=False)
    fit(
        tmp_path / "b",
        DeepMLP(),
        [resumed],
        max_epochs=2,
        n_train=128,
        ckpt_path=tmp_path / "ckpt" / "step=3.ckpt",
    )
    losses = resumed.train_losses
    assert len(losses) == 4
    assert resumed.eval_train_losses == pytest.approx([sum(losses[:2]) / 2, sum(losses[2:]) / 2])


class RankReport(Callback):
    """Writes each rank's recorded curves to ``rank{r}.json`` at the end of fit."""

    def __init__(self, directory, diagnostics):
        self.directory, self.diagnostics = str(directory), diagnostics

    def on_fit_end(self, trainer, pl_module):
        d = self.diagnostics
        report = {"train": d.train_losses, "val": d.val_losses, "checks": [f.check for f in d.findings]}
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def diagnostics_on_two_ranks(directory):
    L.seed_everything(0)
    diagnostics = TrainingDiagnostics()
    train, val = digits_loaders(batch_size=32, n_train=256)
    trainer = L.Trainer(
        **ddp_trainer_kwargs(directory),
        max_epochs=2,
        num_sanity_val_steps=0,
        callbacks=[diagnostics, RankReport(directory, diagnostics)],
    )
    trainer.fit(DeepMLP(), train, val)


@pytest.mark.ddp(scenario=diagnostics_on_two_ranks)
def test_ddp_each_rank_records_and_only_rank_zero_prints(ddp_scenario):
    reports = [json.loads((ddp_scenario.directory / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [len(r["train"]) for r in reports] == [8, 8]  # 128 samples per rank, batches of 32, 2 epochs
    assert [len(r["val"]) for r in reports] == [2, 2]
    assert reports[0]["train"] != reports[1]["train"]  # each rank reads its own shard's loss
    assert [out.count("Training diagnostics") for out in ddp_scenario.stdout] == [1, 0]


def test_summary_goes_to_a_wandb_table(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    L.seed_everything(0)
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="diagnostics")
    diagnostics = TrainingDiagnostics(check_init=False)
    try:
        fit(tmp_path, PlainClassifier(lr=20.0), [diagnostics], max_epochs=1, logger=logger)
        summary = logger.experiment.summary["diagnostics/findings"]
        rows = len(diagnostics.findings) + len(diagnostics.unchecked)
        assert summary["_type"] == "table-file" and summary["nrows"] == rows > len(diagnostics.unchecked)
    finally:
        logger.experiment.finish()


def test_summary_goes_to_tensorboard_text(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    logger = TensorBoardLogger(save_dir=str(tmp_path))
    diagnostics = TrainingDiagnostics(check_init=False)
    with pytest.warns(UserWarning, match="TrainingDiagnostics: the training loss"):
        trainer = fit(tmp_path, PlainClassifier(lr=20.0), [diagnostics], max_epochs=1, logger=logger)
    assert "explosion" in {f.check for f in diagnostics.findings}

    events = EventAccumulator(logger.log_dir, size_guidance={"tensors": 0})
    events.Reload()
    tag = "diagnostics/findings/text_summary"
    assert tag in events.Tags()["tensors"]
    (event,) = events.Tensors(tag)
    assert event.step == trainer.global_step == 8
    lines = event.tensor_proto.string_val[0].decode().splitlines()
    assert lines[:2] == ["| severity | check | message | cause | fix |", "|---|---|---|---|---|"]
    assert lines[2:] == [
        f"| {f.severity} | {f.check} | {f.message} | {f.cause} | {f.fix} |"
        for f in diagnostics.findings + diagnostics.unchecked
    ]
    assert any(line.startswith("| error | explosion | the training loss rose to") for line in lines)


# ------------------------------------------------------------------------------------ own metric names


class OwnNames(PlainClassifier):
    """A user's module that logs ``train_loss``, ``val_loss`` and ``val_acc`` (or ``val_name`` instead)."""

    def __init__(self, val_name: str = "val_loss"):
        super().__init__(lr=0.1)
        self.val_name = val_name
        self.returned: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        self.returned.append(float(loss.detach()))
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log(self.val_name, nn.functional.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())


def test_own_metric_names_are_found_without_arguments(tmp_path):
    L.seed_everything(0)
    model, diagnostics = OwnNames(), TrainingDiagnostics()
    fit(tmp_path, model, [diagnostics], max_epochs=3, n_train=256)
    assert diagnostics.train_losses == pytest.approx(model.returned, rel=1e-6)  # the returned loss
    assert len(diagnostics.val_losses) == 3  # `val_loss` found among the logged names
    assert [f.check for f in diagnostics.unchecked] == []


def test_a_check_without_data_says_so_instead_of_passing(tmp_path, capsys):
    L.seed_everything(0)
    diagnostics, logger = TrainingDiagnostics(), TableLogger()
    with pytest.warns(UserWarning, match="val_metric") as record:
        fit(
            tmp_path,
            OwnNames(val_name="holdout_objective"),
            [diagnostics],
            max_epochs=2,
            n_train=256,
            logger=logger,
        )
    assert len([w for w in record if "val_metric" in str(w.message)]) == 1  # once, not per evaluation
    assert diagnostics.val_losses == []
    (unchecked,) = diagnostics.unchecked
    assert (unchecked.check, unchecked.severity) == ("validation curve", "not checked")
    assert "holdout_objective" in unchecked.message and "`val_metric`" in unchecked.fix
    ((_, _, rows),) = logger.tables
    assert rows == [
        ["ok", "all", "no problems found by the checks that ran", "", ""],
        ["not checked", "validation curve", unchecked.message, "", unchecked.fix],
    ]
    assert "not checked" in capsys.readouterr().out

    named = TrainingDiagnostics(val_metric="holdout_objective")  # the fix the message names
    fit(tmp_path, OwnNames(val_name="holdout_objective"), [named], max_epochs=2, n_train=256)
    assert len(named.val_losses) == 2
    assert [(f.check, f.message) for f in named.unchecked] == [
        ("overfitting", "no data to judge: only 2 evaluations, 3 needed")
    ]
