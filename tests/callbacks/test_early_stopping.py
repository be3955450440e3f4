"""SmoothedEarlyStopping: smoothing, restore-best, warm-up, min_epochs, explosion rule, resume, DDP."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import PlainClassifier, ddp_trainer_kwargs, digits_loaders, quiet_trainer_kwargs
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.callbacks.early_stopping import MetricSmoother, SmoothedEarlyStopping

# a decreasing trend with a two-epoch noise bump at epochs 3-4, then a real plateau from epoch 12
NOISY = [2.0 - 0.1 * e + (0.2 if e in (3, 4) else 0.0) for e in range(12)] + [0.8] * 20


class ScriptedModule(L.LightningModule):
    """Logs a scripted ``val/loss`` per epoch; rank 0 adds ``rank0_shift`` from ``shift_epoch`` on."""

    def __init__(self, values, rank0_shift: float = 0.0, shift_epoch: int = 10**9, train_values=None):
        super().__init__()
        self.values = list(values)
        self.train_values = train_values
        self.rank0_shift = rank0_shift
        self.shift_epoch = shift_epoch
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        if self.train_values is not None:
            self.log("train/loss", torch.tensor(self.train_values[self.current_epoch]), on_epoch=True)
        else:
            self.log("train/loss", loss.detach(), on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        value = self.values[self.current_epoch]
        if self.global_rank == 0 and self.current_epoch >= self.shift_epoch:
            value += self.rank0_shift
        self.log("val/loss", torch.tensor(value))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def tiny_loader():
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(8, 4, generator=g)), batch_size=4)


class WeightRecorder(L.Callback):
    """Keeps a copy of the weights at every training epoch end (after validation)."""

    def __init__(self):
        self.weights = {}

    def on_train_epoch_end(self, trainer, pl_module):
        self.weights[trainer.current_epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def ema_reference(values, alpha):
    out = []
    for t in range(1, len(values) + 1):
        w = [(1 - alpha) ** k for k in range(t)]
        out.append(sum(wk * values[t - 1 - k] for k, wk in enumerate(w)) / sum(w))
    return out


def stop_reference(smoothed, patience, start=0, min_epochs=0, min_delta=0.0):
    """Expected (stop epoch or None, best epoch) of the min-mode patience rule on ``smoothed``."""
    best, best_epoch, wait = math.inf, -1, 0
    for e, v in enumerate(smoothed):
        if e < start:
            continue
        if v + min_delta < best:
            best, best_epoch, wait = v, e, 0
        else:
            wait += 1
            if wait >= patience and e + 1 >= min_epochs:
                return e, best_epoch
    return None, best_epoch


def fit(callbacks, values, tmp_path, max_epochs, **kw):
    torch.manual_seed(0)
    model = ScriptedModule(values, train_values=kw.pop("train_values", None))
    kwargs = {**quiet_trainer_kwargs(tmp_path), **kw}
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=callbacks, **kwargs)
    trainer.fit(model, tiny_loader(), tiny_loader())
    return trainer, model


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"smoothing": "gaussian"}, "smoothing"),
        ({"window": 0}, "window"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": 1.5}, "alpha"),
        ({"divergence_factor": -1.0}, "divergence_factor"),
        ({"start_from_epoch": -1}, "start_from_epoch"),
        ({"patience": -2}, "patience"),
        ({"train_check_every_n_steps": 0}, "train_check_every_n_steps"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SmoothedEarlyStopping("val/loss", **kwargs)


@pytest.mark.parametrize("kind", ["mean", "median"])
def test_window_smoother_matches_statistics(kind):
    values = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    smoother = MetricSmoother(kind, window=3)
    ref = statistics.mean if kind == "mean" else statistics.median
    for t, v in enumerate(values):
        assert smoother.update(v) == pytest.approx(ref(values[max(0, t - 2) : t + 1]))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("ema", 0.0, 5), "alpha"),
        (("ema", 1.5, 5), "alpha"),
        (("mean", 0.3, 0), "window"),
        (("gauss", 0.3, 5), "smoothing"),
    ],
)
def test_metric_smoother_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        MetricSmoother(*args)


def test_smoothing_prevents_noisy_stop_but_plateau_stops(tmp_path):
    plain = EarlyStopping("val/loss", patience=2)
    fit([plain], NOISY, tmp_path, max_epochs=len(NOISY))
    assert plain.stopped_epoch == 4  # the noise bump alone stops Lightning's callback

    class Logged(SmoothedEarlyStopping):
        def on_train_epoch_end(self, trainer, pl_module):
            super().on_train_epoch_end(trainer, pl_module)
            self.seen.append(float(trainer.callback_metrics["val/loss_smoothed"]))

    es = Logged("val/loss", patience=2, min_delta=0.01, smoothing="ema", alpha=0.5, divergence_factor=None)
    es.seen = []
    trainer, _ = fit([es], NOISY, tmp_path, max_epochs=len(NOISY))
    smoothed = ema_reference(NOISY, 0.5)
    expected_stop, expected_best = stop_reference(smoothed, patience=2, min_delta=0.01)
    assert expected_stop is not None and expected_stop > 12  # stops on the real plateau
    assert es.stopped_epoch == expected_stop
    assert trainer.current_epoch == expected_stop + 1
    assert es.best_epoch == expected_best
    assert es.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    assert es.seen == pytest.approx(smoothed[: expected_stop + 1])


@pytest.mark.parametrize("fires", [True, False])
def test_restore_best_weights(tmp_path, fires):
    values = [1.0, 0.8, 0.6, 0.5, 0.55, 0.7, 0.9, 1.0, 1.1, 1.2]
    recorder = WeightRecorder()
    es = SmoothedEarlyStopping(
        "val/loss", patience=3 if fires else 100, smoothing="mean", window=2, restore_best_weights=True
    )
    _, model = fit([recorder, es], values, tmp_path, max_epochs=len(values))
    smoothed = [statistics.mean(values[max(0, t - 1) : t + 1]) for t in range(len(values))]
    expected_stop, expected_best = stop_reference(smoothed, patience=3 if fires else 100)
    assert es.stopped_epoch == (expected_stop if fires else 0)
    assert es.best_epoch == expected_best == 4
    last = max(recorder.weights)
    assert last == (expected_stop if fires else len(values) - 1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, recorder.weights[expected_best][k])
    assert not torch.equal(model.layer.weight, recorder.weights[last]["layer.weight"])


def test_start_from_epoch_and_min_epochs(tmp_path):
    # improves only at epochs 0-1, worsens until 5, improves again 6-8, then plateaus
    values = [1.0, 0.9, 1.0, 1.1, 1.2, 1.3, 0.8, 0.7, 0.6] + [0.65] * 10
    n = len(values)

    es = SmoothedEarlyStopping("val/loss", patience=2, smoothing=None, start_from_epoch=4)
    fit([es], values, tmp_path, max_epochs=n)
    assert (es.stopped_epoch, es.best_epoch) == stop_reference(values, patience=2, start=4)
    assert es.stopped_epoch == 10

    # Lightning's callback stops at min_epochs although the metric improved in between (#19966)
    plain = EarlyStopping("val/loss", patience=2)
    trainer, _ = fit([plain], values, tmp_path, max_epochs=n, min_epochs=8)
    assert trainer.current_epoch == 8
    es = SmoothedEarlyStopping("val/loss", patience=2, smoothing=None)
    trainer, _ = fit([es], values, tmp_path, max_epochs=n, min_epochs=8)
    expected_stop, _ = stop_reference(values, patience=2, min_epochs=8)
    assert es.stopped_epoch == expected_stop == 10
    assert trainer.current_epoch == expected_stop + 1


class StepLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_explosion_rule_on_diverging_run(tmp_path):
    train_loader, val_loader = digits_loaders(batch_size=64, n_train=512)
    es = SmoothedEarlyStopping("val/loss", patience=100, alpha=0.5, train_check_every_n_steps=1)
    steps = StepLosses()
    trainer = L.Trainer(max_epochs=5, callbacks=[steps, es], **quiet_trainer_kwargs(tmp_path))
    torch.manual_seed(0)
    trainer.fit(PlainClassifier(lr=10.0), train_loader, val_loader)
    smoothed = ema_reference(steps.losses, 0.5)
    expected = next(t for t, v in enumerate(smoothed) if v > 3.0 * steps.losses[0])
    assert len(steps.losses) == expected + 1  # stopped right after the step that exploded
    assert es.initial_train_loss == pytest.approx(steps.losses[0])
    assert es.stopping_reason == EarlyStoppingReason.DIVERGENCE_THRESHOLD
    assert "Training loss exploded" in es.stopping_reason_message

    # the same rule on a scripted train loss stops exactly where the reference says
    train_values = [2.0, 1.9, 2.5, 4.0, 7.0, 9.0, 12.0, 15.0]
    es = SmoothedEarlyStopping(
        "val/loss", patience=100, smoothing="mean", window=2, train_monitor="train/loss"
    )
    fit([es], [1.0] * 8, tmp_path, max_epochs=8, train_values=train_values)
    smoothed = [statistics.mean(train_values[max(0, t - 1) : t + 1]) for t in range(8)]
    expected = next(e for e, s in enumerate(smoothed) if s > 3.0 * smoothed[0])
    assert es.stopped_epoch == expected
    assert es.stopping_reason == EarlyStoppingReason.DIVERGENCE_THRESHOLD


def test_missing_metric_lists_available(tmp_path):
    es = SmoothedEarlyStopping("val/los", mode="min")  # a typo: the mode cannot be inferred
    with pytest.raises(RuntimeError, match=r"`val/los`.*`val/loss`"):
        fit([es], NOISY, tmp_path, max_epochs=2)
    es = SmoothedEarlyStopping("val/loss", train_monitor="train/los")
    with pytest.raises(RuntimeError, match=r"`train/los`.*`train/loss`"):
        fit([es], NOISY, tmp_path, max_epochs=2)


class StateRecorder(SmoothedEarlyStopping):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.saved_states = {}

    def on_train_epoch_end(self, trainer, pl_module):
        super().on_train_epoch_end(trainer, pl_module)
        self.saved_states[trainer.current_epoch] = self.state_dict()


def es_kwargs():
    return dict(monitor="val/loss", patience=3, smoothing="median", window=3, restore_best_weights=True)


def test_resume_continues_as_if_never_stopped(tmp_path):
    values = NOISY
    full = StateRecorder(**es_kwargs())
    trainer, model_full = fit([full], values, tmp_path / "full", max_epochs=len(values))
    assert full.stopped_epoch > 6

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first = StateRecorder(**es_kwargs())
    fit([first, ckpt], values, tmp_path / "a", max_epochs=6, enable_checkpointing=True)
    path = tmp_path / "ckpt" / "epoch=5.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    stored = checkpoint["callbacks"][first.state_key]
    assert checkpoint["epoch"] == 5
    expected = first.saved_states[5]
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        if key == "best_weights":
            assert all(torch.equal(value[k], stored[key][k]) for k in value)
        else:
            assert stored[key] == value, key

    resumed = StateRecorder(**es_kwargs())
    torch.manual_seed(1)  # a different init: every weight must come from the checkpoint
    model = ScriptedModule(values)
    trainer = L.Trainer(max_epochs=len(values), callbacks=[resumed], **quiet_trainer_kwargs(tmp_path / "b"))
    trainer.fit(model, tiny_loader(), tiny_loader(), ckpt_path=path)
    assert resumed.stopped_epoch == full.stopped_epoch
    assert resumed.best_epoch == full.best_epoch
    for e in range(6, full.stopped_epoch + 1):
        a, b = full.saved_states[e], resumed.saved_states[e]
        assert {k: v for k, v in a.items() if k != "best_weights"} == {
            k: v for k, v in b.items() if k != "best_weights"
        }
    for k, v in model_full.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])


class RankReport(L.Callback):
    def __init__(self, directory):
        self.directory = str(directory)

    def on_train_end(self, trainer, pl_module):
        es = next(c for c in trainer.callbacks if isinstance(c, SmoothedEarlyStopping))
        report = {"epoch": trainer.current_epoch, "stopped": es.stopped_epoch}
        report["reason"] = es.stopping_reason.value
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


IMPROVING = [1.0 - 0.05 * e for e in range(20)]  # keeps improving on every rank


def ranks_stop_together(directory):
    model = ScriptedModule(IMPROVING, rank0_shift=5.0, shift_epoch=4)  # only rank 0 diverges
    es = SmoothedEarlyStopping("val/loss", patience=2, smoothing="ema", alpha=0.5, divergence_factor=None)
    trainer = L.Trainer(
        max_epochs=20,
        callbacks=[es, RankReport(directory)],
        **ddp_trainer_kwargs(directory),
    )
    trainer.fit(model, tiny_loader(), tiny_loader())


@pytest.mark.ddp(scenario=ranks_stop_together)
def test_ddp_ranks_stop_together(ddp_scenario):
    mean_values = [v + (2.5 if e >= 4 else 0.0) for e, v in enumerate(IMPROVING)]
    expected_stop, _ = stop_reference(ema_reference(mean_values, 0.5), patience=2)
    reports = [json.loads((ddp_scenario.directory / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0] == reports[1]
    assert reports[0]["stopped"] == expected_stop
    assert reports[0]["epoch"] == expected_stop + 1
    assert reports[0]["reason"] == EarlyStoppingReason.PATIENCE_EXHAUSTED.value


class RankStepLoss(L.LightningModule):
    """Logs a scripted per-step ``train/loss`` (no ``sync_dist``); rank 0 adds ``rank0_shift(step)``."""

    def __init__(self, explode_from: int, growth: float):
        super().__init__()
        self.explode_from, self.growth = explode_from, growth
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        value = rank_step_loss(self.global_rank, self.global_step, self.explode_from, self.growth)
        self.log("train/loss", torch.tensor(value), on_step=True, on_epoch=True)
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.tensor(1.0))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def rank_step_loss(rank: int, step: int, explode_from: int, growth: float) -> float:
    value = 2.0 - 0.05 * step  # a healthy, slowly falling loss on every rank
    if rank == 0 and step >= explode_from:
        value += growth * (step - explode_from + 1)
    return value


class StepRankReport(L.Callback):
    def __init__(self, directory):
        self.directory = str(directory)

    def on_train_end(self, trainer, pl_module):
        es = next(c for c in trainer.callbacks if isinstance(c, SmoothedEarlyStopping))
        report = {
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "stopped": es.stopped_epoch,
            "reason": es.stopping_reason.value,
            "message": es.stopping_reason_message,
            "initial": es.initial_train_loss,
        }
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


EXPLODE_FROM, GROWTH = 5, 2.5


def explosion_on_one_rank(directory):
    g = torch.Generator().manual_seed(0)
    train = DataLoader(TensorDataset(torch.randn(32, 4, generator=g)), batch_size=4)  # 4 batches per rank
    es = SmoothedEarlyStopping(
        "val/loss",
        patience=100,
        smoothing="ema",
        alpha=0.5,
        divergence_factor=3.0,
        train_check_every_n_steps=1,
        train_monitor="train/loss",
    )
    trainer = L.Trainer(
        max_epochs=10,
        callbacks=[es, StepRankReport(directory)],
        **ddp_trainer_kwargs(directory),
    )
    trainer.fit(RankStepLoss(EXPLODE_FROM, GROWTH), train, tiny_loader())


@pytest.mark.ddp(scenario=explosion_on_one_rank)
def test_ddp_explosion_on_one_rank_stops_both_with_divergence_reason(ddp_scenario):
    explode_from, growth, steps_per_epoch = EXPLODE_FROM, GROWTH, 4
    mean = [
        (rank_step_loss(0, t, explode_from, growth) + rank_step_loss(1, t, explode_from, growth)) / 2
        for t in range(40)
    ]
    smoothed = ema_reference(mean, 0.5)
    expected = next(t for t, v in enumerate(smoothed) if v > 3.0 * smoothed[0])
    # rank 0 alone would stop an epoch earlier, rank 1 alone never: the rule must see the mean
    rank0 = ema_reference([rank_step_loss(0, t, explode_from, growth) for t in range(40)], 0.5)
    assert next(t for t, v in enumerate(rank0) if v > 3.0 * rank0[0]) // steps_per_epoch == 1
    rank1 = ema_reference([rank_step_loss(1, t, explode_from, growth) for t in range(40)], 0.5)
    assert max(rank1) < 3.0 * rank1[0]
    assert (expected // steps_per_epoch, expected % steps_per_epoch) == (2, 1)  # mid third epoch

    reports = [json.loads((ddp_scenario.directory / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0] == reports[1]
    assert reports[0]["global_step"] == expected + 1  # stopped right after the step that exploded
    assert reports[0]["stopped"] == expected // steps_per_epoch
    assert reports[0]["epoch"] == expected // steps_per_epoch + 1  # the stopped epoch counts as run
    assert reports[0]["reason"] == EarlyStoppingReason.DIVERGENCE_THRESHOLD.value
    assert "Training loss exploded" in reports[0]["message"]
    assert reports[0]["initial"] == pytest.approx(mean[0])


class RankZeroOnlyMetric(L.LightningModule):
    """Logs ``train/loss`` and ``val/loss`` (no ``sync_dist``), ``only_on_rank0`` on rank 0 only."""

    def __init__(self, only_on_rank0: str):
        super().__init__()
        self.only_on_rank0 = only_on_rank0
        self.layer = torch.nn.Linear(4, 1)

    def _log(self, name, value):
        if name != self.only_on_rank0 or self.global_rank == 0:
            self.log(name, value, on_epoch=True)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self._log("train/loss", loss.detach())
        return loss

    def validation_step(self, batch, batch_idx):
        self._log("val/loss", torch.tensor(1.0 - 0.1 * self.current_epoch))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class RankOutcome(L.Callback):
    """Per rank: the weights and early-stopping state at the end of training."""

    def __init__(self, directory):
        self.directory = str(directory)

    def on_train_end(self, trainer, pl_module):
        es = next(c for c in trainer.callbacks if isinstance(c, SmoothedEarlyStopping))
        outcome = {
            "epoch": trainer.current_epoch,
            "smoothed": es.smoothed_value,
            "initial_train_loss": es.initial_train_loss,
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
        }
        torch.save(outcome, Path(self.directory, f"rank{trainer.global_rank}.pt"))


class ErrorRecordingEarlyStopping(SmoothedEarlyStopping):
    """Writes the exception a check raises on this rank to ``rank{r}.error``, the proof that the check
    failed on that rank itself."""

    def __init__(self, directory, **kwargs):
        super().__init__(**kwargs)
        self.directory = str(directory)

    def _recorded(self, trainer, check, *args):
        try:
            check(trainer, *args)
        except Exception as e:
            Path(self.directory, f"rank{trainer.global_rank}.error").write_text(f"{type(e).__name__}: {e}")
            raise

    def _check_monitor(self, trainer, lightning_check):
        self._recorded(trainer, super()._check_monitor, lightning_check)

    def _check_explosion(self, trainer, returned):
        self._recorded(trainer, super()._check_explosion, returned)


def fit_with_metric_on_rank0_only(directory, only_on_rank0, strict):
    es = ErrorRecordingEarlyStopping(
        directory,
        monitor="val/loss",
        strict=strict,
        patience=100,
        divergence_factor=3.0,
        train_monitor="train/loss",
    )
    trainer = L.Trainer(max_epochs=3, callbacks=[es, RankOutcome(directory)], **ddp_trainer_kwargs(directory))
    trainer.fit(RankZeroOnlyMetric(only_on_rank0), tiny_loader(), tiny_loader())


def metric_on_rank0_only_non_strict(directory, only_on_rank0):
    fit_with_metric_on_rank0_only(directory, only_on_rank0, strict=False)


def metric_on_rank0_only_strict(directory, only_on_rank0):
    """Returns the message of the error ``fit`` raised on this rank (None when it did not raise)."""
    try:
        fit_with_metric_on_rank0_only(directory, only_on_rank0, strict=True)
    except Exception as e:
        return str(e)
    return None


@pytest.mark.ddp(scenario=metric_on_rank0_only_non_strict)
@pytest.mark.parametrize("only_on_rank0", ["val/loss", "train/loss"])
def test_ddp_metric_on_one_rank_only_non_strict_skips_on_every_rank(ddp_scenario, only_on_rank0):
    directory = ddp_scenario.directory
    assert not list(directory.glob("*.error"))
    outcomes = [torch.load(directory / f"rank{r}.pt") for r in (0, 1)]
    for outcome in outcomes:
        assert outcome["epoch"] == 3  # trained to max_epochs
        if only_on_rank0 == "val/loss":  # the early-stopping check was skipped, the explosion rule ran
            assert outcome["smoothed"] is None
            assert outcome["initial_train_loss"] is not None
        else:  # the explosion rule was skipped, the early-stopping check ran
            assert outcome["smoothed"] == pytest.approx(ema_reference([1.0, 0.9, 0.8], 0.3)[-1], rel=1e-5)
            assert outcome["initial_train_loss"] is None
    w0, w1 = outcomes[0]["weights"], outcomes[1]["weights"]
    assert w0.keys() == w1.keys()
    for k in w0:
        assert torch.equal(w0[k], w1[k])


@pytest.mark.ddp(scenario=metric_on_rank0_only_strict)
@pytest.mark.parametrize("only_on_rank0", ["val/loss", "train/loss"])
def test_ddp_metric_on_one_rank_only_strict_fails_on_every_rank(ddp_scenario, only_on_rank0):
    directory = ddp_scenario.directory
    for raised in ddp_scenario.results:  # fit raised on every rank
        assert raised is not None and f"metric `{only_on_rank0}` which is not available" in raised
    for r in (0, 1):
        error = (directory / f"rank{r}.error").read_text()
        assert error.startswith("RuntimeError: ")
        assert f"metric `{only_on_rank0}` which is not available" in error
    assert not list(directory.glob("*.pt"))


class StopsOnRankOne(SmoothedEarlyStopping):
    """A user's rule that fires on rank 1 only, at ``epoch``."""

    def __init__(self, epoch, **kwargs):
        super().__init__(**kwargs)
        self.epoch = epoch
        self.where = (0, 0)

    def _run_early_stopping_check(self, trainer):
        self.where = (trainer.global_rank, trainer.current_epoch)
        super()._run_early_stopping_check(trainer)

    def _evaluate_stopping_criteria(self, current):
        should_stop, reason = super()._evaluate_stopping_criteria(current)
        if self.where == (1, self.epoch):
            self.stopping_reason = EarlyStoppingReason.STOPPING_THRESHOLD
            return True, "The rank-1 rule fired."
        return should_stop, reason


def rank_one_stops(directory):
    values = [1.0 - 0.05 * e for e in range(10)]  # keeps improving: only the rank-1 rule stops
    es = StopsOnRankOne(2, monitor="val/loss", patience=100, divergence_factor=None)
    trainer = L.Trainer(
        max_epochs=10, callbacks=[es, StepRankReport(directory)], **ddp_trainer_kwargs(directory)
    )
    trainer.fit(ScriptedModule(values), tiny_loader(), tiny_loader())


@pytest.mark.ddp(scenario=rank_one_stops)
def test_ddp_every_rank_records_the_reason_of_the_rank_that_stopped(ddp_scenario):
    reports = [json.loads((ddp_scenario.directory / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0] == reports[1]
    assert (reports[0]["stopped"], reports[0]["epoch"]) == (2, 3)
    assert reports[0]["reason"] == EarlyStoppingReason.STOPPING_THRESHOLD.value
    assert reports[0]["message"] == "The rank-1 rule fired."


# ---------------------------------------------------------------- a user's own module and metric names


class OwnNames(L.LightningModule):
    """A user's module, not the recipe: logs ``train_loss``, ``val_loss`` and a scripted ``val_acc``."""

    def __init__(self, val_acc, manual: bool = False):
        super().__init__()
        self.val_acc = list(val_acc)
        self.automatic_optimization = not manual
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean() + 1.0
        self.log("train_loss", loss.detach(), on_epoch=True)
        if self.automatic_optimization:
            return loss
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        return None

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", torch.tensor(1.0))
        self.log("val_acc", torch.tensor(self.val_acc[self.current_epoch]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


class ReturnedLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append((trainer.current_epoch, float(outputs["loss"])))


def fit_own(callbacks, val_acc, tmp_path, manual=False, **kw):
    torch.manual_seed(0)
    trainer = L.Trainer(
        max_epochs=len(val_acc), callbacks=callbacks, **{**quiet_trainer_kwargs(tmp_path), **kw}
    )
    trainer.fit(OwnNames(val_acc, manual), tiny_loader(), tiny_loader())
    return trainer


def test_own_metric_names_infer_max_and_watch_the_returned_loss(tmp_path):
    val_acc = [0.5, 0.7, 0.9, 0.8, 0.85, 0.8, 0.75, 0.7]
    es = SmoothedEarlyStopping(monitor="val_acc", smoothing=None, patience=2, restore_best_weights=True)
    losses = ReturnedLosses()
    fit_own([losses, es], val_acc, tmp_path)
    assert es.mode == "max"  # inferred: with "min" the run would stop at epoch 2 on the rising accuracy
    best_epoch = max(range(len(val_acc)), key=val_acc.__getitem__)
    assert es.best_epoch == best_epoch == 2
    assert es.stopped_epoch == 4 and es.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED
    # the explosion rule's baseline is the mean loss training_step returned in the first epoch
    first_epoch = [loss for epoch, loss in losses.losses if epoch == 0]
    assert es.initial_train_loss == pytest.approx(statistics.mean(first_epoch), rel=1e-6)


def test_no_returned_loss_turns_the_explosion_rule_off_with_one_warning(tmp_path):
    es = SmoothedEarlyStopping(monitor="val_loss", patience=100)
    with pytest.warns(UserWarning, match="explosion rule is off") as record:
        trainer = fit_own([es], [0.5] * 3, tmp_path, manual=True)
    assert trainer.current_epoch == 3  # trained to the end, no crash mid-run
    messages = [str(w.message) for w in record if "explosion rule is off" in str(w.message)]
    assert len(messages) == 1 and "`train_monitor`" in messages[0]
    assert es.initial_train_loss is None


def test_wrong_validation_monitor_is_reported_at_the_sanity_check(tmp_path):
    es = SmoothedEarlyStopping(monitor="val_accuracy")
    trainer = L.Trainer(max_epochs=2, callbacks=[es], **quiet_trainer_kwargs(tmp_path))
    with pytest.raises(
        RuntimeError, match=r"`val_accuracy`.*after the first validation.*`val_acc`.*`monitor`"
    ):
        trainer.fit(OwnNames([0.5, 0.6]), tiny_loader(), tiny_loader())
    assert trainer.global_step == 0  # no training step was spent before the report


def test_non_strict_missing_monitor_warns_once_at_the_first_validation(tmp_path):
    es = SmoothedEarlyStopping(monitor="val_accuracy", strict=False, verbose=False)
    with pytest.warns(RuntimeWarning, match="`val_accuracy`") as record:
        fit_own([es], [0.5, 0.6, 0.7], tmp_path, num_sanity_val_steps=0)
    messages = [str(w.message) for w in record if "`val_accuracy`" in str(w.message)]
    assert len(messages) == 1 and "after the first validation" in messages[0]
    assert es.smoothed_value is None and es.stopped_epoch == 0  # the check was skipped, training went on


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("val/acc", "max"),
        ("val_acc", "max"),
        ("val/acc_ema", "max"),
        ("valid/accuracy", "max"),
        ("val_f1", "max"),
        ("val/auroc", "max"),
        ("val/loss", "min"),
        ("val_loss", "min"),
        ("train/loss_epoch", "min"),
        ("val/error", "min"),
        ("top1_err", "min"),
        ("val_mse", "min"),
        ("val/score", None),
        ("lr", None),
        ("val/acc_loss", None),
        ("valacc", None),
        ("val/los", None),
    ],
)
def test_mode_auto_from_metric_names(name, mode):
    if mode is None:
        with pytest.raises(ValueError, match=rf"monitor='{name}'.*mode='min'.*mode='max'"):
            SmoothedEarlyStopping(name)
        assert SmoothedEarlyStopping(name, mode="max").mode == "max"  # an explicit mode always works
    else:
        assert SmoothedEarlyStopping(name).mode == mode
