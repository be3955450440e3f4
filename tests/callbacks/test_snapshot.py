import itertools
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import (
    PlainClassifier,
    ddp_spawn_trainer_kwargs,
    digits_loaders,
    digits_tensors,
    quiet_trainer_kwargs,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.callbacks.snapshot import SnapshotEnsemble

# 256 training samples in batches of 64: 4 optimizer steps per epoch.
N_TRAIN, BATCH, EPOCHS = 256, 64, 6
TOTAL = N_TRAIN // BATCH * EPOCHS  # 24


class NormalisingClassifier(PlainClassifier):
    """A user module that normalises batches after transfer, as in-memory DataModules do."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return (x - 0.5) * 2.0, y


class Probe(Callback):
    """Records the LR used by each optimizer step and the weights after each step."""

    def __init__(self):
        self.lrs, self.weights, self.empty_state_at = [], {}, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not trainer.optimizers[0].state:
            self.empty_state_at.append(trainer.global_step)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.weights[trainer.global_step] = {k: v.clone() for k, v in pl_module.state_dict().items()}


def paper_lr(t, total, cycles, a0):
    length = math.ceil(total / cycles)
    return a0 / 2 * (math.cos(math.pi * ((t - 1) % length) / length) + 1)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One paper-schedule run on a normalising user module, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("snapshot_fit")
    L.seed_everything(0)
    model = NormalisingClassifier(lr=0.1)
    snap, probe = SnapshotEnsemble(cycles=4, ensemble_size=3), Probe()
    train, val = digits_loaders(BATCH, n_train=N_TRAIN)
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[snap, probe], **quiet_trainer_kwargs(tmp))
    trainer.fit(model, train, val)
    return trainer, model, snap, probe, val, tmp


def test_paper_lr_curve_and_one_snapshot_per_cycle_minimum(fitted):
    _, _, snap, probe, _, tmp = fitted
    expected = [paper_lr(t, TOTAL, 4, 0.1) for t in range(1, TOTAL + 1)]
    assert len(probe.lrs) == TOTAL
    assert probe.lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)

    assert snap.snapshot_steps == [6, 12, 18, 24]
    assert len(snap.snapshots) == 4
    for i, step in enumerate(snap.snapshot_steps):
        cycle = probe.lrs[step - 6 : step]
        assert probe.lrs[step - 1] == min(cycle) < cycle[0] == pytest.approx(0.1)
        assert all(torch.equal(v, probe.weights[step][k]) for k, v in snap.snapshots[i].items())
        on_disk = torch.load(tmp / "checkpoints" / f"snapshot_{i + 1}.pt", weights_only=True)
        assert on_disk["global_step"] == step and on_disk["index"] == i + 1
        assert all(torch.equal(v, on_disk["state_dict"][k]) for k, v in snap.snapshots[i].items())


def _manual_member_probs(snapshot, x):
    member = NormalisingClassifier()
    member.load_state_dict(snapshot)
    member.eval()
    with torch.no_grad():
        return member((x - 0.5) * 2.0).softmax(-1)


def test_ensemble_metrics_match_manual_and_leave_live_weights_untouched(fitted):
    trainer, model, snap, _, val, _ = fitted
    x, y = digits_tensors()
    x, y = x[N_TRAIN:], y[N_TRAIN:]
    members = snap.snapshots[-3:]
    probs = [_manual_member_probs(s, x) for s in members]
    mean = torch.stack(probs).mean(0)

    before = {k: v.clone() for k, v in model.state_dict().items()}

    metrics = trainer.validate(model, val, verbose=False)[0]
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert metrics["val/acc_ensemble"] == pytest.approx((mean.argmax(1) == y).float().mean().item(), abs=1e-6)
    nll = -mean.log().gather(1, y[:, None]).mean().item()
    assert metrics["val/loss_ensemble"] == pytest.approx(nll, rel=1e-5)
    for i, p in zip([2, 3, 4], probs, strict=True):
        assert metrics[f"val/acc_snapshot_{i}"] == pytest.approx(
            (p.argmax(1) == y).float().mean().item(), abs=1e-6
        )
    # the last snapshot is the final model, so its accuracy equals the module's own metric
    assert metrics["val/acc_snapshot_4"] == pytest.approx(metrics["val/acc"], abs=1e-6)
    assert "val/acc_snapshot_1" not in metrics


class Stop(Callback):
    def __init__(self, at_epoch):
        self.at_epoch = at_epoch

    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch + 1 == self.at_epoch:
            trainer.should_stop = True  # the run ends here, as if the job were killed


def test_resume_gives_same_snapshots_as_uninterrupted_run(tmp_path):
    kwargs = {**quiet_trainer_kwargs(tmp_path), "enable_checkpointing": True}
    train, val = digits_loaders(BATCH, n_train=N_TRAIN)

    L.seed_everything(0)
    full_model, full = (
        PlainClassifier(lr=0.1),
        SnapshotEnsemble(cycles=4, reset_momentum=True, save_files=False),
    )
    L.Trainer(max_epochs=EPOCHS, callbacks=[full], limit_val_batches=1, **kwargs).fit(full_model, train, val)

    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    crashed = SnapshotEnsemble(cycles=4, reset_momentum=True, save_files=False)
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[crashed, ckpt, Stop(3)], limit_val_batches=1, **kwargs)
    trainer.fit(PlainClassifier(lr=0.1), train, val)
    assert trainer.global_step == 12 and crashed.snapshot_steps == [6, 12]

    path = tmp_path / "ckpt" / "epoch=2.ckpt"  # after 12 steps: snapshot 2 and a momentum reset just taken
    checkpoint = torch.load(path, weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("SnapshotEnsemble")]
    assert state["snapshot_steps"] == [6, 12] and state["base_lrs"] == [0.1]

    L.seed_everything(123)  # the resumed run must not depend on the fresh seed
    resumed_model, resumed = (
        PlainClassifier(lr=0.1),
        SnapshotEnsemble(cycles=4, reset_momentum=True, save_files=False),
    )
    L.Trainer(max_epochs=EPOCHS, callbacks=[resumed], limit_val_batches=1, **kwargs).fit(
        resumed_model, train, val, ckpt_path=str(path), weights_only=True
    )
    assert resumed.snapshot_steps == full.snapshot_steps == [6, 12, 18, 24]
    for a, b in zip(full.snapshots, resumed.snapshots, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k])


class RestartsClassifier(PlainClassifier):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_user_warm_restarts_snapshots_at_restarts_and_resets_momentum(tmp_path):
    # T_0=4, T_mult=2 over 24 steps: cycles end at steps 4 and 12 (the next would end at 28).
    snap, probe = SnapshotEnsemble(cycles=2, schedule="user", reset_momentum=True, save_files=False), Probe()
    train, val = digits_loaders(BATCH, n_train=N_TRAIN)
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=EPOCHS, callbacks=[snap, probe], limit_val_batches=1, **quiet_trainer_kwargs(tmp_path)
    )
    trainer.fit(RestartsClassifier(lr=0.1), train, val)
    assert snap.snapshot_steps == [4, 12]
    assert probe.lrs[3] == min(probe.lrs[:4]) and probe.lrs[11] == min(probe.lrs[4:12])
    assert probe.lrs[4] == pytest.approx(0.1) and probe.lrs[12] == pytest.approx(0.1)
    assert probe.empty_state_at == [0, 4, 12]  # fresh optimizer, then cleared at both restarts

    with pytest.raises(MisconfigurationException, match=r"`cycles`=3 .*completes only 2 cycles in 24"):
        L.Trainer(
            max_epochs=EPOCHS,
            callbacks=[SnapshotEnsemble(cycles=3, schedule="user")],
            **quiet_trainer_kwargs(tmp_path),
        ).fit(RestartsClassifier(), train, val)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cycles": 0}, r"`cycles` must be an integer >= 1, got 0"),
        ({"cycles": 2.5}, r"`cycles` must be an integer >= 1, got 2.5"),
        ({"cycles": 4, "ensemble_size": 5}, r"`ensemble_size` must be an integer in \[1, cycles=4\], got 5"),
        ({"cycles": 4, "ensemble_size": 0}, r"`ensemble_size` .* got 0"),
        ({"schedule": "cosine"}, r"`schedule` must be one of .*got 'cosine'"),
        ({"lr": -0.1}, r"`lr` must be a finite number > 0 or None, got -0.1"),
        ({"lr": 0.1, "schedule": "user"}, r"`lr`=0.1 only applies to schedule='paper'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        SnapshotEnsemble(**kwargs)


@pytest.mark.parametrize(("cycles", "steps"), [(5, 4), (6, 10)])
def test_impossible_cycle_count_fails_at_setup(tmp_path, cycles, steps):
    # 6 cycles of ceil(10/6)=2 steps cover 10 steps in only 5 cycles.
    model = PlainClassifier()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = digits_loaders(BATCH, n_train=N_TRAIN)
    trainer = L.Trainer(
        max_steps=steps, callbacks=[SnapshotEnsemble(cycles=cycles)], **quiet_trainer_kwargs(tmp_path)
    )
    with pytest.raises(
        MisconfigurationException, match=rf"`cycles`={cycles} does not fit in {steps} optimizer steps"
    ):
        trainer.fit(model, train, val)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_two_instances_have_distinct_state_keys():
    assert SnapshotEnsemble(cycles=2).state_key != SnapshotEnsemble(cycles=3).state_key


class GatherSnapshots(Callback):
    """On every rank, gather all snapshot tensors and check they agree; rank 0 writes the verdict."""

    def __init__(self, snap, out):
        self.snap, self.out = snap, out

    def on_fit_end(self, trainer, pl_module):
        flat = torch.cat([v.flatten().float() for s in self.snap.snapshots for v in s.values()])
        gathered = trainer.strategy.all_gather(flat)
        if trainer.is_global_zero:
            torch.save(
                {"equal": torch.equal(gathered[0], gathered[1]), "n": len(self.snap.snapshots)}, self.out
            )


@pytest.mark.ddp
def test_ddp_snapshots_identical_across_ranks_and_metrics_reduced(tmp_path):
    x, y = digits_tensors()
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32)  # 4 steps per epoch per rank
    val = DataLoader(TensorDataset(x[256:512], y[256:512]), batch_size=64)
    snap = SnapshotEnsemble(cycles=2, dirpath=str(tmp_path / "snaps"))
    kwargs = ddp_spawn_trainer_kwargs(tmp_path)
    trainer = L.Trainer(
        max_epochs=2, callbacks=[snap, GatherSnapshots(snap, tmp_path / "gathered.pt")], **kwargs
    )
    L.seed_everything(0)
    trainer.fit(PlainClassifier(lr=0.1), train, val)

    verdict = torch.load(tmp_path / "gathered.pt", weights_only=True)
    assert verdict == {"equal": True, "n": 2}
    files = sorted(Path(tmp_path / "snaps").glob("snapshot_*.pt"))
    assert [f.name for f in files] == ["snapshot_1.pt", "snapshot_2.pt"]
    probs = []
    for f in files:
        member = PlainClassifier()
        member.load_state_dict(torch.load(f, weights_only=True)["state_dict"])
        probs.append(F.softmax(member(x[256:512]), -1).detach())
    mean = torch.stack(probs).mean(0)
    expected = (mean.argmax(1) == y[256:512]).float().mean().item()
    assert trainer.callback_metrics["val/acc_ensemble"].item() == pytest.approx(expected, abs=1e-6)


class EpochRestartsClassifier(PlainClassifier):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=2)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


class EpochProbe(Callback):
    """Records, per 1-based epoch, the LRs of its optimizer steps, its final weights and momentum state."""

    def __init__(self):
        self.lrs, self.weights, self.steps, self.empty_state_at = {}, {}, {}, []

    def on_train_epoch_start(self, trainer, pl_module):
        if not trainer.optimizers[0].state:
            self.empty_state_at.append(trainer.current_epoch + 1)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.setdefault(trainer.current_epoch + 1, []).append(optimizer.param_groups[0]["lr"])

    def on_train_epoch_end(self, trainer, pl_module):
        epoch = trainer.current_epoch + 1
        self.weights[epoch] = {k: v.clone() for k, v in pl_module.state_dict().items()}
        self.steps[epoch] = trainer.global_step


@pytest.mark.parametrize("cycles", [3, 2])
def test_user_warm_restarts_per_epoch_snapshot_at_cycle_ends(tmp_path, cycles):
    # 128 samples in batches of 64: 2 optimizer steps per epoch, 15 epochs.
    epochs, steps_per_epoch, a0 = 15, 2, 0.1
    # Cycle i of CosineAnnealingWarmRestarts(T_0=2, T_mult=2) ends at epoch 2 * (2**i - 1): 2, 6, 14, 30.
    cycle_ends = [2 * (2**i - 1) for i in range(1, 5) if 2 * (2**i - 1) <= epochs]
    assert cycle_ends == [2, 6, 14]
    expected_epochs = cycle_ends[-cycles:]

    snap = SnapshotEnsemble(cycles=cycles, schedule="user", reset_momentum=True, save_files=False)
    probe = EpochProbe()
    train, val = digits_loaders(BATCH, n_train=128)
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[snap, probe], limit_val_batches=1, **quiet_trainer_kwargs(tmp_path)
    )
    model = EpochRestartsClassifier(lr=a0)
    trainer.fit(model, train, val)

    # The LR is constant within an epoch and follows the cosine of its cycle.
    starts = [0, *cycle_ends]
    lengths = [b - a for a, b in itertools.pairwise(starts)] + [16]
    epoch_lr = {}
    for epoch in range(1, epochs + 1):
        cycle = max(i for i, s in enumerate(starts) if s < epoch)
        t_cur, t_i = epoch - 1 - starts[cycle], lengths[cycle]
        expected = a0 / 2 * (math.cos(math.pi * t_cur / t_i) + 1)
        assert probe.lrs[epoch] == pytest.approx([expected] * steps_per_epoch, rel=1e-12, abs=1e-15)
        epoch_lr[epoch] = probe.lrs[epoch][0]
    # The restarts seen in the LR curve are exactly the cycle ends.
    assert [e for e in range(1, epochs) if epoch_lr[e + 1] > epoch_lr[e]] == cycle_ends

    assert len(snap.snapshots) == cycles
    assert snap.snapshot_steps == [e * steps_per_epoch for e in expected_epochs]
    assert [probe.steps[e] for e in expected_epochs] == snap.snapshot_steps
    for snapshot, epoch in zip(snap.snapshots, expected_epochs, strict=True):
        assert snapshot.keys() == probe.weights[epoch].keys()
        assert all(torch.equal(v, probe.weights[epoch][k]) for k, v in snapshot.items())
        start = starts[starts.index(epoch) - 1]
        cycle_lrs = [epoch_lr[e] for e in range(start + 1, epoch + 1)]
        assert epoch_lr[epoch] == min(cycle_lrs) < cycle_lrs[0] == pytest.approx(a0)
        assert epoch_lr[epoch + 1] == pytest.approx(a0)  # the scheduler restarts right after
    # Snapshots are not all the same model: training moved between them.
    assert not torch.equal(snap.snapshots[0]["net.1.weight"], snap.snapshots[-1]["net.1.weight"])
    # Momentum is cleared after every completed cycle, not at any other epoch.
    assert probe.empty_state_at == [1, *[e + 1 for e in cycle_ends]]


@pytest.mark.parametrize(("budget", "cycles"), [({"max_steps": 22}, 4), ({"max_epochs": 5}, 3)])
def test_paper_schedule_with_last_cycle_cut_short(tmp_path, budget, cycles):
    # 4 optimizer steps per epoch: 22 steps in cycles of 6 (last one 4), or 20 steps in cycles of 7 (last 6).
    total = budget.get("max_steps", 4 * budget.get("max_epochs", 0))
    length = -(-total // cycles)
    assert total % cycles != 0 and total % length != 0
    ends = [*range(length, total, length), total]
    assert len(ends) == cycles and ends[-1] - ends[-2] < length

    snap, probe = SnapshotEnsemble(cycles=cycles, save_files=False), Probe()
    train, val = digits_loaders(BATCH, n_train=N_TRAIN)
    L.seed_everything(0)
    trainer = L.Trainer(
        **budget, callbacks=[snap, probe], limit_val_batches=1, **quiet_trainer_kwargs(tmp_path)
    )
    model = PlainClassifier(lr=0.1)
    with pytest.warns(UserWarning, match=rf"{total} optimizer steps are not a multiple of the cycle length"):
        trainer.fit(model, train, val)

    assert trainer.global_step == total
    expected = [paper_lr(t, total, cycles, 0.1) for t in range(1, total + 1)]
    assert len(probe.lrs) == total
    assert probe.lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)

    assert len(snap.snapshots) == cycles
    assert snap.snapshot_steps == ends
    for snapshot, step in zip(snap.snapshots, ends, strict=True):
        assert all(torch.equal(v, probe.weights[step][k]) for k, v in snapshot.items())
        cycle = probe.lrs[step - ((step - 1) % length) - 1 : step]
        assert probe.lrs[step - 1] == min(cycle) < cycle[0] == pytest.approx(0.1)
    # The last snapshot is the final model.
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in snap.snapshots[-1].items())


class CountStarts(Callback):
    def __init__(self):
        self.started = []

    def on_sanity_check_start(self, trainer, pl_module):
        self.started.append("sanity_check")

    def on_train_start(self, trainer, pl_module):
        self.started.append("train")


def _cyclic(opt):
    return {
        "scheduler": torch.optim.lr_scheduler.CyclicLR(opt, 0.001, 0.1, step_size_up=3),
        "interval": "step",
    }


def _lambda_cosine_restarts(opt):
    cosine = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (math.cos(math.pi * (s % 6) / 6) + 1))
    return {"scheduler": cosine, "interval": "step"}


@pytest.mark.parametrize("make_scheduler", [_cyclic, _lambda_cosine_restarts, None])
def test_user_schedule_without_warm_restarts_fails_before_training(tmp_path, make_scheduler):
    class UserScheduled(PlainClassifier):
        def configure_optimizers(self):
            opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
            if make_scheduler is None:
                return opt
            return {"optimizer": opt, "lr_scheduler": make_scheduler(opt)}

    model, counter = UserScheduled(lr=0.1), CountStarts()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = digits_loaders(BATCH, n_train=N_TRAIN)
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        callbacks=[SnapshotEnsemble(cycles=2, schedule="user"), counter],
        **quiet_trainer_kwargs(tmp_path),
    )
    with pytest.raises(
        MisconfigurationException,
        match=r"schedule='user'\) needs a torch\.optim\.lr_scheduler\.CosineAnnealingWarmRestarts.*"
        r"use schedule='paper'",
    ):
        trainer.fit(model, train, val)
    assert counter.started == [] and trainer.global_step == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_user_warm_restarts_per_epoch_counts_only_epochs_that_max_steps_completes(tmp_path):
    # 2 optimizer steps per epoch; max_steps=29 ends the run in epoch 15, after 14 complete epochs,
    # although max_epochs allows 100: the cycles ending at epochs 30 and 62 never happen.
    train, val = digits_loaders(BATCH, n_train=128)
    snap = SnapshotEnsemble(cycles=2, schedule="user", save_files=False)
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=100, max_steps=29, callbacks=[snap], limit_val_batches=1, **quiet_trainer_kwargs(tmp_path)
    )
    trainer.fit(EpochRestartsClassifier(lr=0.1), train, val)
    assert trainer.global_step == 29
    assert snap.snapshot_steps == [6 * 2, 14 * 2]  # the last two cycle ends, epochs 6 and 14

    # max_steps=27: 13 complete epochs hold only the cycles ending at epochs 2 and 6.
    model = EpochRestartsClassifier(lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = L.Trainer(
        max_epochs=100,
        max_steps=27,
        callbacks=[SnapshotEnsemble(cycles=3, schedule="user")],
        **quiet_trainer_kwargs(tmp_path),
    )
    with pytest.raises(
        MisconfigurationException, match=r"`cycles`=3 .*completes only 2 cycles in 13 complete"
    ):
        trainer.fit(model, train, val)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
