"""MomentumSchedule and OptimizerSwitch on a plain user model and real digits."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import PlainClassifier, ddp_trainer_kwargs, digits_loaders, quiet_trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tricks.callbacks.momentum import MomentumSchedule
from lightning_tricks.callbacks.optimizer_switch import OptimizerSwitch


class Configured(PlainClassifier):
    """PlainClassifier with a chosen optimizer and an optional StepLR."""

    def __init__(
        self, optimizer: str = "sgd", lr: float = 0.1, step_lr: bool = False, one_cycle: bool = False
    ):
        super().__init__(lr=lr)
        self.optimizer_name = optimizer
        self.step_lr = step_lr
        self.one_cycle = one_cycle

    def configure_optimizers(self):
        if self.optimizer_name == "adam":
            opt = torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        elif self.optimizer_name == "adagrad":
            opt = torch.optim.Adagrad(self.parameters(), lr=self.hparams.lr)
        else:
            opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.1)
        if self.one_cycle:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=100)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if self.step_lr:
            return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)}
        return opt


class MomentumRecorder(L.Callback):
    def __init__(self):
        self.by_epoch, self.by_step = {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        group = trainer.optimizers[0].param_groups[0]
        value = group["momentum"] if "momentum" in group else group["betas"][0]
        self.by_step.append((trainer.current_epoch, batch_idx, value))
        self.by_epoch.setdefault(trainer.current_epoch, value)


def run(tmp_path, model, callbacks, max_epochs, n_train=128, **kw):
    train_loader, val_loader = digits_loaders(batch_size=64, n_train=n_train)
    kwargs = {**quiet_trainer_kwargs(tmp_path), "limit_val_batches": 1, **kw}
    trainer = L.Trainer(max_epochs=max_epochs, callbacks=callbacks, **kwargs)
    trainer.fit(model, train_loader, val_loader)
    return trainer


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"start": -0.1}, "start"),
        ({"end": 1.0}, "end"),
        ({"ramp_epochs": 0}, "ramp_epochs"),
        ({"interval": "batch"}, "interval"),
    ],
)
def test_momentum_schedule_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MomentumSchedule(**kwargs)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_momentum_ramp_per_epoch(tmp_path, optimizer):
    recorder = MomentumRecorder()
    schedule = MomentumSchedule(0.5, 0.9, ramp_epochs=4)
    run(tmp_path, Configured(optimizer, lr=0.01), [schedule, recorder], 6)
    expected = {e: 0.5 + 0.4 * min(e / 4, 1.0) for e in range(6)}
    assert recorder.by_epoch == pytest.approx(expected)
    assert schedule.state_dict() == {}  # a pure function of progress: nothing to checkpoint


def test_momentum_ramp_per_step_and_adam_beta2(tmp_path):
    recorder = MomentumRecorder()
    model = Configured("adam", lr=0.01)
    trainer = run(
        tmp_path, model, [MomentumSchedule(0.5, 0.99, ramp_epochs=1.5, interval="step"), recorder], 2
    )
    n = trainer.num_training_batches
    for epoch, batch_idx, value in recorder.by_step:
        t = epoch + batch_idx / n
        assert value == pytest.approx(0.5 + 0.49 * min(t / 1.5, 1.0))
    assert trainer.optimizers[0].param_groups[0]["betas"][1] == 0.999


def test_momentum_schedule_needs_momentum_and_yields_to_one_cycle(tmp_path):
    with pytest.raises(ValueError, match="Adagrad has neither"):
        run(tmp_path, Configured("adagrad"), [MomentumSchedule()], 1)
    recorder = MomentumRecorder()
    with pytest.warns(UserWarning, match="cycle_momentum=True"):
        run(tmp_path, Configured("sgd", one_cycle=True), [MomentumSchedule(0.5, 0.9, 2), recorder], 2)
    # OneCycleLR's own momentum (max_momentum 0.95 at the start), not the ramp's 0.5
    assert recorder.by_step[0][2] == pytest.approx(0.95)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "switch_epoch"),
        ({"switch_epoch": 0}, "switch_epoch"),
        ({"monitor": "val/loss", "patience": 0}, "patience"),
        ({"switch_epoch": 2, "momentum": 1.0}, "momentum"),
        ({"switch_epoch": 2, "momentum": 0.0, "nesterov": True}, "nesterov"),
        ({"switch_epoch": 2, "sgd_lr": -1.0}, "sgd_lr"),
        ({"switch_epoch": 2, "mode": "up"}, "mode"),
        ({"switch_epoch": 2, "weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_optimizer_switch_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerSwitch(**kwargs)


def test_optimizer_switch_mode_from_the_monitor_name():
    assert OptimizerSwitch(monitor="val/acc").mode == "max"
    assert OptimizerSwitch(monitor="val_loss").mode == "min"
    with pytest.raises(ValueError, match=r"monitor='val/score'.*mode='min'"):
        OptimizerSwitch(monitor="val/score")


def test_switch_epoch_beyond_the_run_is_warned_before_training(tmp_path):
    class WarnedBeforeFirstStep(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 0:
                self.before = [str(w.message) for w in caught if "switch_epoch=50" in str(w.message)]

    probe = WarnedBeforeFirstStep()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = run(tmp_path, Configured("adam", lr=0.01), [probe, OptimizerSwitch(switch_epoch=50)], 2)
    (message,) = probe.before
    assert re.search(r"switch_epoch=50.*max_epochs=2.*no switch.*`switch_epoch` to at most 1", message)
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)  # indeed never switched
    # with a monitor the plateau can still switch
    with pytest.warns(UserWarning, match=r"switch_epoch=50.*only a plateau of `val/loss` can switch"):
        run(tmp_path, Configured("adam", lr=0.01), [OptimizerSwitch(50, monitor="val/loss")], 1)


def test_wrong_monitor_is_reported_at_the_sanity_check(tmp_path):
    switch = OptimizerSwitch(monitor="val/los", mode="min")
    model = Configured("adam", lr=0.01)
    with pytest.raises(RuntimeError, match=r"`val/los`.*Did you mean `val/loss`\?.*`monitor`"):
        run(tmp_path, model, [switch], 2)
    assert model.trainer.global_step == 0


def adam_reference_lr(adam: torch.optim.Adam, momentum: float) -> float:
    """Least-squares scalar step matching Adam along m_hat, times (1 - momentum), from the raw state."""
    group = adam.param_groups[0]
    b1, b2 = group["betas"]
    m_all, v_all = [], []
    for p in group["params"]:
        s = adam.state[p]
        t = int(s["step"])
        m_all.append((s["exp_avg"] / (1 - b1**t)).flatten().double())
        v_all.append((s["exp_avg_sq"] / (1 - b2**t)).flatten().double())
    m, v = torch.cat(m_all), torch.cat(v_all)
    adam_step = group["lr"] * m / (v.sqrt() + group["eps"])
    alpha = torch.dot(adam_step, m) / torch.dot(m, m)
    return float((1 - momentum) * alpha)


class SwitchProbe(L.Callback):
    """Captures the Adam optimizer just before the switch epoch and the optimizer of each epoch."""

    def __init__(self, switch_epoch):
        self.switch_epoch = switch_epoch
        self.expected_lr = None
        self.kinds, self.lrs, self.val_loss = {}, {}, {}

    def on_train_epoch_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        if trainer.current_epoch == self.switch_epoch - 1:
            self.expected_lr = adam_reference_lr(opt, 0.9)
        self.kinds[trainer.current_epoch] = type(opt).__name__
        self.lrs[trainer.current_epoch] = opt.param_groups[0]["lr"]
        if "val/loss" in trainer.callback_metrics:
            self.val_loss[trainer.current_epoch] = float(trainer.callback_metrics["val/loss"])


def test_switch_at_epoch_lr_scheduler_and_training(tmp_path):
    torch.manual_seed(0)
    probe = SwitchProbe(2)
    switch = OptimizerSwitch(switch_epoch=2, momentum=0.9)
    model = Configured("adam", lr=0.01, step_lr=True)
    trainer = run(tmp_path, model, [switch, probe], 5, n_train=512)
    assert probe.kinds == {0: "Adam", 1: "Adam", 2: "SGD", 3: "SGD", 4: "SGD"}
    sgd = trainer.optimizers[0]
    assert model.optimizers().optimizer is sgd
    # StepLR(gamma=0.5) after two epochs put Adam at 0.0025; SGD starts at the derived rate and halves on
    assert switch.sgd_lrs[0] == pytest.approx(probe.expected_lr, rel=1e-6)
    assert probe.lrs[2] == pytest.approx(probe.expected_lr * 0.5, rel=1e-6)
    assert probe.lrs[4] == pytest.approx(probe.expected_lr * 0.125, rel=1e-6)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is sgd
    assert sgd.param_groups[0]["momentum"] == 0.9
    assert sgd.state  # SGD actually stepped (momentum buffers)
    assert probe.val_loss[4] < probe.val_loss[1]  # training kept improving after the switch


def test_switch_on_plateau_and_fixed_lr(tmp_path):
    class Plateau(PlainClassifier):
        def validation_step(self, batch, batch_idx):
            self.log("val/score", torch.tensor([1.0, 0.5, 0.6, 0.7, 0.8, 0.9][self.current_epoch]))

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=0.01)

    probe = SwitchProbe(99)
    switch = OptimizerSwitch(monitor="val/score", mode="min", patience=2, sgd_lr=0.05, nesterov=True)
    run(tmp_path, Plateau(), [switch, probe], 6)
    # best at epoch 1, no improvement at 2 and 3 -> switch at the start of epoch 4
    assert switch.switched_epoch == 4
    assert probe.kinds[3] == "Adam" and probe.kinds[4] == "SGD"
    assert probe.lrs[4] == 0.05


def test_resume_after_switch_continues_with_sgd(tmp_path):
    def make():
        torch.manual_seed(0)
        return Configured("adam", lr=0.01, step_lr=True)

    full_model = make()
    full = run(tmp_path / "full", full_model, [OptimizerSwitch(switch_epoch=2)], 4)

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    first = OptimizerSwitch(switch_epoch=2)
    run(tmp_path / "a", make(), [first, ckpt], 3, enable_checkpointing=True)
    path = tmp_path / "ckpt" / "epoch=2.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["callbacks"][first.state_key]["switched_epoch"] == 2
    assert "momentum_buffer" in next(iter(checkpoint["optimizer_states"][0]["state"].values()))

    resumed_switch = OptimizerSwitch(switch_epoch=2)
    resumed_model = make()
    train_loader, val_loader = digits_loaders(batch_size=64, n_train=128)
    kwargs = {**quiet_trainer_kwargs(tmp_path / "b"), "limit_val_batches": 1}
    trainer = L.Trainer(max_epochs=4, callbacks=[resumed_switch], **kwargs)
    trainer.fit(resumed_model, train_loader, val_loader, ckpt_path=path)
    assert isinstance(trainer.optimizers[0], torch.optim.SGD)
    assert trainer.lr_scheduler_configs[0].scheduler.optimizer is trainer.optimizers[0]
    assert resumed_switch.sgd_lrs == first.sgd_lrs
    assert trainer.optimizers[0].param_groups[0]["lr"] == full.optimizers[0].param_groups[0]["lr"]
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k]), k


class RankPlateau(PlainClassifier):
    """Adam; ``val/score`` logged without ``sync_dist``: worse on rank 0 from epoch 3, better on rank 1."""

    def validation_step(self, batch, batch_idx):
        self.log("val/score", torch.tensor(rank_plateau_score(self.global_rank, self.current_epoch)))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.01)


def rank_plateau_score(rank: int, epoch: int) -> float:
    return 0.8 + 0.05 * (epoch - 2) ** 2 if rank == 0 and epoch >= 3 else 1.0 - 0.1 * epoch


def rank_plateau_scores(rank: int, epochs: int) -> list[float]:
    return [rank_plateau_score(rank, e) for e in range(epochs)]


def plateau_switch_reference(values: list[float], patience: int) -> int | None:
    """Epoch at whose start a min-mode plateau rule with ``patience`` switches, or None."""
    best, wait = float("inf"), 0
    for e, v in enumerate(values):
        best, wait = (v, 0) if v < best else (best, wait + 1)
        if wait >= patience:
            return e + 1
    return None


class AdamBeforeSwitch(L.Callback):
    """Before the switch callback runs at an epoch start: the reference SGD rate from the Adam state."""

    def __init__(self):
        self.expected_lr = None

    def on_train_epoch_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        if isinstance(opt, torch.optim.Adam) and opt.state:
            self.expected_lr = adam_reference_lr(opt, 0.9)


class SwitchRankReport(L.Callback):
    """After the switch callback: each epoch's optimizer; at the end everything a rank knows, to a file."""

    def __init__(self, out: str, probe: AdamBeforeSwitch):
        self.out, self.probe = out, probe
        self.kinds, self.lrs, self.momenta = [], [], []

    def on_train_epoch_start(self, trainer, pl_module):
        group = trainer.optimizers[0].param_groups[0]
        self.kinds.append(type(trainer.optimizers[0]).__name__)
        self.lrs.append(group["lr"])
        self.momenta.append(group.get("momentum"))

    def on_train_end(self, trainer, pl_module):
        switch = next(c for c in trainer.callbacks if isinstance(c, OptimizerSwitch))
        payload = {
            "kinds": self.kinds,
            "lrs": self.lrs,
            "momenta": self.momenta,
            "expected_lr": self.probe.expected_lr,
            "switched_epoch": switch.switched_epoch,
            "sgd_lrs": switch.sgd_lrs,
            "stepped": bool(trainer.optimizers[0].state),
            "weights": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
        }
        torch.save(payload, Path(self.out) / f"rank{trainer.global_rank}.pt")


SWITCH_EPOCHS, SWITCH_PATIENCE = 8, 2


def plateau_on_one_rank(directory):
    torch.manual_seed(0)
    probe = AdamBeforeSwitch()
    switch = OptimizerSwitch(monitor="val/score", mode="min", patience=SWITCH_PATIENCE, momentum=0.9)
    train, val = digits_loaders(batch_size=32, n_train=256)  # 4 steps per epoch on each rank
    trainer = L.Trainer(
        **ddp_trainer_kwargs(directory),
        max_epochs=SWITCH_EPOCHS,
        limit_val_batches=1,
        callbacks=[probe, switch, SwitchRankReport(str(directory), probe)],
    )
    trainer.fit(RankPlateau(), train, val)


@pytest.mark.ddp(scenario=plateau_on_one_rank)
def test_ddp_plateau_on_one_rank_switches_both_at_the_same_epoch(ddp_scenario):
    epochs, patience = SWITCH_EPOCHS, SWITCH_PATIENCE
    mean = [(a + b) / 2 for a, b in zip(*(rank_plateau_scores(r, epochs) for r in (0, 1)), strict=True)]
    expected = plateau_switch_reference(mean, patience)
    assert expected == 6
    # rank 0 alone would switch earlier, rank 1 alone never: the decision must come from the mean
    assert plateau_switch_reference(rank_plateau_scores(0, epochs), patience) == 5
    assert plateau_switch_reference(rank_plateau_scores(1, epochs), patience) is None

    r0, r1 = (torch.load(ddp_scenario.directory / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for r in (r0, r1):
        assert r["switched_epoch"] == expected
        assert r["kinds"] == ["Adam"] * expected + ["SGD"] * (epochs - expected)
        assert r["momenta"][expected:] == [0.9] * (epochs - expected)
        assert r["stepped"]
    # the rate derived from the Adam state at the switch, identical on both ranks
    assert r0["expected_lr"] is not None and r0["expected_lr"] == pytest.approx(r1["expected_lr"], rel=1e-12)
    assert r0["sgd_lrs"] == r1["sgd_lrs"] == [pytest.approx(r0["expected_lr"], rel=1e-6)]
    assert r0["lrs"][expected:] == r1["lrs"][expected:] == [r0["sgd_lrs"][0]] * (epochs - expected)
    assert r0["weights"].keys() == r1["weights"].keys()
    for name, value in r0["weights"].items():
        assert torch.equal(value, r1["weights"][name]), name


class MomentumRankReport(L.Callback):
    """After the schedule: the momentum/beta1 each rank trains with at every batch, to a file."""

    def __init__(self, out: str):
        self.out = out
        self.by_step = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        for group in trainer.optimizers[0].param_groups:
            self.by_step.append((trainer.current_epoch, batch_idx, group["betas"][0], group["betas"][1]))

    def on_train_end(self, trainer, pl_module):
        payload = {"by_step": self.by_step, "batches": trainer.num_training_batches}
        torch.save(payload, Path(self.out) / f"rank{trainer.global_rank}.pt")


def momentum_ramp_on_two_ranks(directory):
    torch.manual_seed(0)
    train, val = digits_loaders(batch_size=32, n_train=256)  # 128 samples per rank: 4 batches
    trainer = L.Trainer(
        **ddp_trainer_kwargs(directory),
        max_epochs=3,
        limit_val_batches=1,
        callbacks=[
            MomentumSchedule(0.5, 0.95, ramp_epochs=1.5, interval="step"),
            MomentumRankReport(str(directory)),
        ],
    )
    trainer.fit(Configured("adam", lr=0.01), train, val)


@pytest.mark.ddp(scenario=momentum_ramp_on_two_ranks)
def test_ddp_momentum_ramp_identical_on_both_ranks(ddp_scenario):
    r0, r1 = (torch.load(ddp_scenario.directory / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["batches"] == r1["batches"] == 4
    assert r0["by_step"] == r1["by_step"]
    assert [(e, b) for e, b, _, _ in r0["by_step"]] == [(e, b) for e in range(3) for b in range(4)]
    for epoch, batch_idx, beta1, beta2 in r0["by_step"]:
        t = epoch + batch_idx / 4
        assert beta1 == pytest.approx(0.5 + 0.45 * min(t / 1.5, 1.0), abs=1e-12), (epoch, batch_idx)
        assert beta2 == 0.999
