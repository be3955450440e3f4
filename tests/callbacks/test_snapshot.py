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
from torch.nn import functional as F
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.callbacks.snapshot import SnapshotEnsemble
from lightning_tricks.recipes.schedules import SchedulerConfig, build_scheduler

# 256 training samples in batches of 64: 4 optimizer steps per epoch.
N_TRAIN, BATCH, EPOCHS = 256, 64, 6
TOTAL = N_TRAIN // BATCH * EPOCHS  # 24


class Scheduled(PlainClassifier):
    """A user module whose schedule is the recipe's ``build_scheduler(config)`` over the whole run."""

    def __init__(self, lr: float = 0.1, schedule: dict | None = None, **kwargs):
        super().__init__(lr=lr, **kwargs)
        self.schedule = SchedulerConfig(**(schedule or {"name": "snapshot", "interval": "step"}))

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        total = int(self.trainer.estimated_stepping_batches)
        sched = build_scheduler(opt, self.schedule, total, max(1, total // self.trainer.max_epochs))
        return {"optimizer": opt, "lr_scheduler": sched}


def paper(cycles: int) -> dict:
    return {"name": "snapshot", "interval": "step", "kwargs": {"cycles": cycles}}


class NormalisingClassifier(Scheduled):
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


def torch_restarts_trace(n: int, a0: float = 0.1, warmup: int = 0, **cawr) -> list[float]:
    """LR of steps 1..n from torch's CosineAnnealingWarmRestarts (after ``warmup`` steps not traced)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=a0)
    sched = CosineAnnealingWarmRestarts(opt, **cawr)
    lrs = []
    for _ in range(n - warmup):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def rises(lrs: list[float], offset: int = 0) -> list[int]:
    """1-based steps after which the LR goes up (cycle ends seen in the curve)."""
    return [offset + t for t in range(1, len(lrs)) if lrs[t] > lrs[t - 1]]


def has_tensor(obj) -> bool:
    if isinstance(obj, torch.Tensor):
        return True
    if isinstance(obj, dict):
        return any(has_tensor(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return any(has_tensor(v) for v in obj)
    return False


def fit_probed(tmp_path, model, snap) -> Probe:
    """Fit ``model`` for EPOCHS epochs of 4 steps with ``snap`` and a :class:`Probe`; return the probe."""
    probe = Probe()
    train, val = digits_loaders(BATCH, n_train=N_TRAIN)
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=EPOCHS, callbacks=[snap, probe], limit_val_batches=1, **quiet_trainer_kwargs(tmp_path)
    )
    trainer.fit(model, train, val)
    return probe


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One paper-schedule run on a normalising user module, shared by the tests that only read it."""
    tmp = tmp_path_factory.mktemp("snapshot_fit")
    L.seed_everything(0)
    model = NormalisingClassifier(lr=0.1, schedule=paper(4))
    snap, probe = SnapshotEnsemble(cycles=4, ensemble_size=3), Probe()
    train, val = digits_loaders(BATCH, n_train=N_TRAIN)
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[snap, probe], **quiet_trainer_kwargs(tmp))
    trainer.fit(model, train, val)
    return trainer, model, snap, probe, val, tmp


def test_paper_schedule_equals_torch_warm_restarts_and_snapshots_at_its_cycle_ends(fitted):
    _, _, snap, probe, _, tmp = fitted
    reference = torch_restarts_trace(TOTAL, T_0=math.ceil(TOTAL / 4))
    assert probe.lrs == pytest.approx(reference, rel=1e-12, abs=1e-15)
    cycle_ends = [*rises(reference), TOTAL]  # the last cycle ends with the run
    assert cycle_ends == [6, 12, 18, 24]

    assert snap.snapshot_steps == cycle_ends
    assert len(snap.snapshots) == 4
    for i, step in enumerate(snap.snapshot_steps):
        cycle = probe.lrs[step - 6 : step]
        assert probe.lrs[step - 1] == min(cycle) < cycle[0] == pytest.approx(0.1)
        assert all(torch.equal(v, probe.weights[step][k]) for k, v in snap.snapshots[i].items())
        path = tmp / "checkpoints" / f"snapshot_{i + 1}.pt"
        assert snap.snapshot_paths[i] == str(path)
        on_disk = torch.load(path, weights_only=True)
        assert on_disk["global_step"] == step and on_disk["index"] == i + 1
    assert not list((tmp / "checkpoints").glob("*.tmp"))


def _manual_member_probs(snapshot, x):
    member = PlainClassifier()
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


def test_resume_restores_the_snapshot_set_and_checkpoints_hold_no_model_copies(tmp_path):
    kwargs = {**quiet_trainer_kwargs(tmp_path), "enable_checkpointing": True, "limit_val_batches": 1}
    train, val = digits_loaders(BATCH, n_train=N_TRAIN)

    L.seed_everything(0)
    full_model = Scheduled(lr=0.1, schedule=paper(4))
    full = SnapshotEnsemble(cycles=4, reset_momentum=True, dirpath=str(tmp_path / "full"))
    L.Trainer(max_epochs=EPOCHS, callbacks=[full], **kwargs).fit(full_model, train, val)

    L.seed_everything(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    crashed = SnapshotEnsemble(cycles=4, reset_momentum=True, dirpath=str(tmp_path / "crashed"))
    trainer = L.Trainer(max_epochs=EPOCHS, callbacks=[crashed, ckpt, Stop(3)], **kwargs)
    trainer.fit(Scheduled(lr=0.1, schedule=paper(4)), train, val)
    assert trainer.global_step == 12 and crashed.snapshot_steps == [6, 12]

    path = tmp_path / "ckpt" / "epoch=2.ckpt"  # after 12 steps: snapshot 2 and a momentum reset just taken
    checkpoint = torch.load(path, weights_only=True)
    (state,) = [v for k, v in checkpoint["callbacks"].items() if k.startswith("SnapshotEnsemble")]
    assert not has_tensor(state)  # paths and steps only, no model copies
    assert state["snapshot_steps"] == [6, 12]
    assert state["snapshot_paths"] == [str(tmp_path / "crashed" / f"snapshot_{i}.pt") for i in (1, 2)]

    L.seed_everything(123)  # the resumed run must not depend on the fresh seed
    resumed_model = Scheduled(lr=0.1, schedule=paper(4))
    resumed = SnapshotEnsemble(cycles=4, reset_momentum=True, dirpath=str(tmp_path / "resumed"))
    L.Trainer(max_epochs=EPOCHS, callbacks=[resumed], **kwargs).fit(
        resumed_model, train, val, ckpt_path=str(path), weights_only=True
    )
    assert resumed.snapshot_steps == full.snapshot_steps == [6, 12, 18, 24]
    assert resumed.snapshot_paths[:2] == state["snapshot_paths"]
    assert resumed.snapshot_paths[2:] == [str(tmp_path / "resumed" / f"snapshot_{i}.pt") for i in (3, 4)]
    for a, b in zip(full.snapshots, resumed.snapshots, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for k, v in full_model.state_dict().items():
        assert torch.equal(v, resumed_model.state_dict()[k])

    # A checkpoint whose snapshot files are gone fails before training, naming the files.
    Path(state["snapshot_paths"][0]).unlink()
    with pytest.raises(FileNotFoundError, match=r"snapshot files that do not exist: .*snapshot_1\.pt"):
        L.Trainer(max_epochs=EPOCHS, callbacks=[SnapshotEnsemble(cycles=4)], **kwargs).fit(
            Scheduled(lr=0.1, schedule=paper(4)), train, val, ckpt_path=str(path), weights_only=True
        )


class RestartsClassifier(PlainClassifier):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        sched = CosineAnnealingWarmRestarts(opt, T_0=4, T_mult=2)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_user_warm_restarts_snapshots_at_restarts_and_resets_momentum(tmp_path):
    # T_0=4, T_mult=2 over 24 steps: cycles end at steps 4 and 12 (the next would end at 28).
    snap = SnapshotEnsemble(cycles=2, reset_momentum=True)
    probe = fit_probed(tmp_path, RestartsClassifier(lr=0.1), snap)
    assert snap.snapshot_steps == rises(torch_restarts_trace(TOTAL, T_0=4, T_mult=2)) == [4, 12]
    assert probe.lrs[3] == min(probe.lrs[:4]) and probe.lrs[11] == min(probe.lrs[4:12])
    assert probe.lrs[4] == pytest.approx(0.1) and probe.lrs[12] == pytest.approx(0.1)
    assert probe.empty_state_at == [0, 4, 12]  # fresh optimizer, then cleared at both restarts

    with pytest.raises(ValueError, match=r"`cycles`=3 .*completes only 2 cycles in 24"):
        L.Trainer(
            max_epochs=EPOCHS, callbacks=[SnapshotEnsemble(cycles=3)], **quiet_trainer_kwargs(tmp_path)
        ).fit(RestartsClassifier(), *digits_loaders(BATCH, n_train=N_TRAIN))


@pytest.mark.parametrize(
    ("schedule", "reference"),
    [
        # warm-up 3 + CosineAnnealingWarmRestarts(T_0=4, T_mult=2): the restarts of torch's class, shifted
        (
            {"name": "cosine_restarts", "interval": "step", "warmup": 3, "kwargs": {"T_0": 4, "T_mult": 2}},
            lambda: rises(torch_restarts_trace(TOTAL, warmup=3, T_0=4, T_mult=2), offset=3),
        ),
        # the paper's schedule after a warm-up of 4: 5 cycles of ceil(20/5)=4, the last ending the run
        (
            {"name": "snapshot", "interval": "step", "warmup": 4, "kwargs": {"cycles": 5}},
            lambda: [*rises(torch_restarts_trace(TOTAL, warmup=4, T_0=4), offset=4), TOTAL],
        ),
    ],
    ids=["cosine_restarts", "snapshot"],
)
def test_warmup_composes_with_restarts_and_snapshots_land_on_true_restarts(tmp_path, schedule, reference):
    expected = reference()
    snap = SnapshotEnsemble()
    probe = fit_probed(tmp_path, Scheduled(lr=0.1, schedule=schedule), snap)
    assert snap.snapshot_steps == expected and len(expected) >= 2
    warm = schedule["warmup"]
    assert probe.lrs[:warm] == sorted(probe.lrs[:warm]) and probe.lrs[warm] == pytest.approx(0.1)
    for step in expected[:-1]:
        assert probe.lrs[step] > probe.lrs[step - 1]  # the LR restarts right after each snapshot


def test_sgdr_peak_decay_snapshots_at_timm_restarts(tmp_path):
    timm_scheduler = pytest.importorskip("timm.scheduler")
    schedule = {"name": "cosine_restarts", "interval": "step", "warmup": 2}
    schedule["kwargs"] = {"T_0": 5, "T_mult": 2, "cycle_decay": 0.5, "cooldown": 4}
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    # the cooldown of 4 leaves 24 - 2 - 4 = 18 steps: the cycles of 5 and 10 fit, the third does not
    ref = timm_scheduler.CosineLRScheduler(
        opt, t_initial=5, cycle_mul=2, cycle_decay=0.5, cycle_limit=2, warmup_t=2, warmup_lr_init=0.001,
        warmup_prefix=True, t_in_epochs=False,
    )  # fmt: skip
    expected_lrs = [ref._get_lr(t)[0] for t in range(TOTAL)]
    restarts = rises(expected_lrs[2:], offset=2)
    snap = SnapshotEnsemble()
    probe = fit_probed(tmp_path, Scheduled(lr=0.1, schedule=schedule), snap)
    assert probe.lrs == pytest.approx(expected_lrs, rel=1e-12, abs=1e-15)
    assert restarts == [7]
    # snapshots at the restart and at the start of the cooldown (the end of the second cycle)
    assert snap.snapshot_steps == [7, 17] and probe.lrs[17:] == pytest.approx([0.0] * 7)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cycles": 0}, r"`cycles` must be None or an integer >= 1, got 0"),
        ({"cycles": 2.5}, r"`cycles` must be None or an integer >= 1, got 2.5"),
        (
            {"cycles": 4, "ensemble_size": 5},
            r"`ensemble_size` must be None or an integer in \[1, cycles=4\], got 5",
        ),
        ({"cycles": 4, "ensemble_size": 0}, r"`ensemble_size` .* got 0"),
        ({"reset_momentum": "yes"}, r"`reset_momentum` must be a bool, got 'yes'"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SnapshotEnsemble(**kwargs)


@pytest.mark.parametrize(("cycles", "steps"), [(5, 4), (6, 10)])
def test_impossible_cycle_count_fails_before_training(tmp_path, cycles, steps):
    # 6 cycles of ceil(10/6)=2 steps cover 10 steps in only 5 cycles.
    model = Scheduled(schedule=paper(cycles))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = digits_loaders(BATCH, n_train=N_TRAIN)
    trainer = L.Trainer(
        max_steps=steps, callbacks=[SnapshotEnsemble(cycles=cycles)], **quiet_trainer_kwargs(tmp_path)
    )
    with pytest.raises(
        ValueError, match=rf"scheduler\.kwargs\.cycles={cycles} does not fit in {steps} scheduler steps"
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


def snapshots_on_two_ranks(directory) -> float:
    """Returns this rank's logged ``val/acc_ensemble``."""
    x, y = digits_tensors()
    train = DataLoader(TensorDataset(x[:256], y[:256]), batch_size=32)  # 4 steps per epoch per rank
    val = DataLoader(TensorDataset(x[256:512], y[256:512]), batch_size=64)
    snap = SnapshotEnsemble(cycles=2, dirpath=str(directory / "snaps"))
    kwargs = ddp_trainer_kwargs(directory)
    trainer = L.Trainer(
        max_epochs=2, callbacks=[snap, GatherSnapshots(snap, directory / "gathered.pt")], **kwargs
    )
    L.seed_everything(0)
    trainer.fit(Scheduled(lr=0.1, schedule=paper(2)), train, val)
    return trainer.callback_metrics["val/acc_ensemble"].item()


@pytest.mark.ddp(scenario=snapshots_on_two_ranks)
def test_ddp_snapshots_identical_across_ranks_and_metrics_reduced(ddp_scenario):
    directory = ddp_scenario.directory
    x, y = digits_tensors()
    verdict = torch.load(directory / "gathered.pt", weights_only=True)
    assert verdict == {"equal": True, "n": 2}
    files = sorted(Path(directory / "snaps").glob("snapshot_*.pt"))
    assert [f.name for f in files] == ["snapshot_1.pt", "snapshot_2.pt"]
    assert [torch.load(f, weights_only=True)["global_step"] for f in files] == [4, 8]
    probs = []
    for f in files:
        member = PlainClassifier()
        member.load_state_dict(torch.load(f, weights_only=True)["state_dict"])
        probs.append(F.softmax(member(x[256:512]), -1).detach())
    mean = torch.stack(probs).mean(0)
    expected = (mean.argmax(1) == y[256:512]).float().mean().item()
    assert ddp_scenario.results == (pytest.approx(expected, abs=1e-6),) * 2


class EpochRestartsClassifier(PlainClassifier):
    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)
        sched = CosineAnnealingWarmRestarts(opt, T_0=2, T_mult=2)
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
    # LR of epochs 1..15 from torch's CosineAnnealingWarmRestarts(T_0=2, T_mult=2); cycles end at 2, 6, 14
    reference = torch_restarts_trace(epochs, a0, T_0=2, T_mult=2)
    cycle_ends = rises(reference)
    assert cycle_ends == [2, 6, 14]
    expected_epochs = cycle_ends[-cycles:]

    snap = SnapshotEnsemble(cycles=cycles, reset_momentum=True)
    probe = EpochProbe()
    train, val = digits_loaders(BATCH, n_train=128)
    L.seed_everything(0)
    trainer = L.Trainer(
        max_epochs=epochs, callbacks=[snap, probe], limit_val_batches=1, **quiet_trainer_kwargs(tmp_path)
    )
    model = EpochRestartsClassifier(lr=a0)
    trainer.fit(model, train, val)

    # The LR is constant within an epoch and is torch's, untouched by the callback.
    starts = [0, *cycle_ends]
    epoch_lr = {}
    for epoch in range(1, epochs + 1):
        expected = [reference[epoch - 1]] * steps_per_epoch
        assert probe.lrs[epoch] == pytest.approx(expected, rel=1e-12, abs=1e-15)
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

    snap, probe = SnapshotEnsemble(cycles=cycles), Probe()
    train, val = digits_loaders(BATCH, n_train=N_TRAIN)
    L.seed_everything(0)
    trainer = L.Trainer(
        **{"max_epochs": 100, **budget},
        callbacks=[snap, probe],
        limit_val_batches=1,
        **quiet_trainer_kwargs(tmp_path),
    )
    model = Scheduled(lr=0.1, schedule=paper(cycles))
    with pytest.warns(UserWarning, match=rf"{total} scheduler steps are not a multiple of the cycle length"):
        trainer.fit(model, train, val)

    assert trainer.global_step == total
    assert probe.lrs == pytest.approx(torch_restarts_trace(total, T_0=length), rel=1e-12, abs=1e-15)

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


def test_without_scheduler_fails_before_training(tmp_path):
    model, counter = PlainClassifier(lr=0.1), CountStarts()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, val = digits_loaders(BATCH, n_train=N_TRAIN)
    trainer = L.Trainer(
        max_epochs=EPOCHS, callbacks=[SnapshotEnsemble(cycles=2), counter], **quiet_trainer_kwargs(tmp_path)
    )
    with pytest.raises(ValueError, match=r"returned no scheduler.*name: snapshot"):
        trainer.fit(model, train, val)
    assert counter.started == [] and trainer.global_step == 0
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


class WarmupLambdaRestarts(PlainClassifier):
    """A schedule the callback cannot read: 3 warm-up steps, then cosine cycles of 6 steps (a LambdaLR)."""

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)

        def factor(s):
            return (s + 1) / 4 if s < 3 else 0.5 * (math.cos(math.pi * ((s - 3) % 6) / 6) + 1)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def test_unreadable_schedule_is_watched_and_warmup_is_not_a_restart(tmp_path):
    snap = SnapshotEnsemble(cycles=2, reset_momentum=True)
    probe = fit_probed(tmp_path, WarmupLambdaRestarts(lr=0.1), snap)
    restarts = rises(torch_restarts_trace(TOTAL, warmup=3, T_0=6), offset=3)
    assert restarts == [9, 15, 21]
    assert snap.snapshot_steps == restarts[-2:]  # the last two of three restarts are kept
    assert [s["net.1.weight"].sum() for s in snap.snapshots] == [
        probe.weights[s]["net.1.weight"].sum() for s in restarts[-2:]
    ]
    assert probe.empty_state_at == [0, *restarts]
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("snapshot_*.pt")) == [
        f"snapshot_{i}.pt" for i in (1, 2, 3)
    ]


def test_user_warm_restarts_per_epoch_counts_only_epochs_that_max_steps_completes(tmp_path):
    # 2 optimizer steps per epoch; max_steps=29 ends the run in epoch 15, after 14 complete epochs,
    # although max_epochs allows 100: the cycles ending at epochs 30 and 62 never happen.
    train, val = digits_loaders(BATCH, n_train=128)
    snap = SnapshotEnsemble(cycles=2)
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
        max_epochs=100, max_steps=27, callbacks=[SnapshotEnsemble(cycles=3)], **quiet_trainer_kwargs(tmp_path)
    )
    with pytest.raises(ValueError, match=r"`cycles`=3 .*completes only 2 cycles in 13 complete"):
        trainer.fit(model, train, val)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
