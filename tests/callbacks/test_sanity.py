"""InitLossCheck and OverfitTinyBatch: verdicts against independent references, and no trace left."""

from __future__ import annotations

import copy
import json
import math
import random
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import numpy as np
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
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DistributedSampler

from lightning_tricks.callbacks._training_state import OptimizerSnapshot
from lightning_tricks.callbacks.init_loss import InitLossCheck
from lightning_tricks.callbacks.overfit import OverfitTinyBatch
from lightning_tricks.callbacks.sanity import SanityCheckError

LN10 = math.log(10)


# --------------------------------------------------------------------------------------------- modules


class BNClassifier(PlainClassifier):
    """Batch-norm, dropout, SGD with momentum and a StepLR schedule: every kind of state there is."""

    def __init__(self, lr: float = 0.1):
        super().__init__(lr=lr)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Dropout(0.3), nn.Linear(64, 10)
        )

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)]


class SmoothedClassifier(PlainClassifier):
    """Trains with label smoothing through its own ``data_loss`` and starts from uniform predictions."""

    def __init__(self, smoothing: float = 0.3):
        super().__init__()
        self.smoothing = smoothing
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def data_loss(self, logits, targets):
        return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)


class PenalizedClassifier(PlainClassifier):
    """Exposes ``penalty()`` and ``regularization_scaled()``; ``honest=False`` ignores the factor."""

    def __init__(self, l2: float = 1e-3, honest: bool = True):
        super().__init__()
        self.l2, self.honest = l2, honest

    def penalty(self):
        return self.l2 / 2 * sum((p**2).sum() for n, p in self.named_parameters() if n.endswith("weight"))

    @contextmanager
    def regularization_scaled(self, factor: float):
        saved = self.l2
        if self.honest:
            self.l2 = saved * factor
        try:
            yield
        finally:
            self.l2 = saved


class Regressor(PlainClassifier):
    """One output trained with MSE: not a classifier."""

    def __init__(self):
        super().__init__()
        self.net[-1] = nn.Linear(64, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.mse_loss(self(x).squeeze(1), y.float())


class DetachedBody(PlainClassifier):
    """A bug: the body's output is detached and the head is frozen, so only a bias can learn."""

    def __init__(self):
        super().__init__()
        self.net[-1].requires_grad_(False)
        self.bias = nn.Parameter(torch.zeros(10))

    def forward(self, x):
        return self.net[-1](self.net[:-1](x).detach()) + self.bias


class FullyDetached(PlainClassifier):
    """A bug: the whole output is computed without a graph."""

    def forward(self, x):
        with torch.no_grad():
            return self.net(x)

    def training_step(self, batch, batch_idx):
        return None


# --------------------------------------------------------------------------------------------- helpers


def full_state(trainer, module) -> dict:
    """Everything a check could touch, deep-copied."""
    return {
        "params": {n: p.detach().clone() for n, p in module.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()},
        "buffers": {n: b.clone() for n, b in module.named_buffers()},
        "training": {n: m.training for n, m in module.named_modules()},
        "dropout": [m.p for m in module.modules() if isinstance(m, nn.Dropout)],
        "optimizers": [copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
        "schedulers": [copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "numpy_rng": np.random.get_state()[1].copy(),
    }


def assert_same(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    else:
        assert a == b, path


class Snapshot(Callback):
    """Records the full state at ``on_train_start`` (callbacks run in list order)."""

    def __init__(self, prime_optimizer: bool = False):
        self.prime_optimizer = prime_optimizer
        self.state = None

    def on_train_start(self, trainer, pl_module):
        if self.prime_optimizer:  # one real step, so momentum buffers and gradients exist
            x, y = digits_tensors(32)
            opt = trainer.optimizers[0]
            F.cross_entropy(pl_module(x), y).backward()
            opt.step()
        self.state = full_state(trainer, pl_module)


class HookCounter(Callback):
    def __init__(self):
        self.counts = {"batch_start": 0, "before_backward": 0, "before_optimizer_step": 0}

    def on_train_batch_start(self, *args):
        self.counts["batch_start"] += 1

    def on_before_backward(self, *args):
        self.counts["before_backward"] += 1

    def on_before_optimizer_step(self, *args):
        self.counts["before_optimizer_step"] += 1


def fit(tmp_path, model, callbacks, max_steps=1, shuffle=False, **kwargs):
    train, val = digits_loaders(batch_size=32, n_train=256, shuffle=shuffle)
    trainer = L.Trainer(
        **{**quiet_trainer_kwargs(tmp_path), **kwargs},
        max_steps=max_steps,
        callbacks=callbacks,
        limit_val_batches=0,
    )
    trainer.fit(model, train, val)
    return trainer


# --------------------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: InitLossCheck(on_fail="ignore"), "on_fail"),
        (lambda: InitLossCheck(num_batches=0), "num_batches"),
        (lambda: InitLossCheck(tolerance=0), "tolerance"),
        (lambda: InitLossCheck(tolerance=-0.1), "tolerance"),
        (lambda: InitLossCheck(regularization_factor=1.0), "regularization_factor"),
        (lambda: OverfitTinyBatch(on_fail="log"), "on_fail"),
        (lambda: OverfitTinyBatch(num_samples=0), "num_samples"),
        (lambda: OverfitTinyBatch(max_steps=0), "max_steps"),
        (lambda: OverfitTinyBatch(loss_threshold=0.0), "loss_threshold"),
        (lambda: OverfitTinyBatch(lr=-1.0), "lr"),
    ],
)
def test_bad_arguments_fail_at_construction(factory, match):
    with pytest.raises(ValueError, match=match):
        factory()


# --------------------------------------------------------------------------------------------- InitLossCheck


def test_init_loss_healthy_model_matches_reference_and_leaves_no_trace(tmp_path):
    L.seed_everything(0)
    model = BNClassifier()
    reference = copy.deepcopy(model).train()
    reference.net[4].p = 0.0
    x, y = digits_tensors(128)
    with torch.no_grad():  # the check's loss: 4 batches of 32, training-mode BN per batch, no dropout
        expected = torch.stack(
            [F.cross_entropy(reference(xb), yb) for xb, yb in zip(x.split(32), y.split(32), strict=True)]
        )
    before, after = Snapshot(), Snapshot()
    check = InitLossCheck(num_batches=4, on_fail="raise")
    fit(tmp_path, model, [before, check, after])
    assert check.passed is True
    assert check.expected == pytest.approx(LN10)
    assert check.measured == pytest.approx(float(expected.mean()), rel=1e-5)
    assert_same(before.state, after.state)


def test_init_loss_huge_weights_fail_with_values_in_message(tmp_path):
    L.seed_everything(0)
    model = PlainClassifier()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(20)
    with pytest.raises(
        SanityCheckError, match=r"loss at initialization \d+\.\d+, expected ln\(10\) = 2\.3026"
    ):
        fit(tmp_path, copy.deepcopy(model), [InitLossCheck(on_fail="raise")])
    check = InitLossCheck(on_fail="warn")
    with pytest.warns(UserWarning, match="InitLossCheck failed") as record:
        fit(tmp_path, model, [check])
    assert check.passed is False and check.measured > 1.3 * LN10
    messages = [str(w.message) for w in record if "InitLossCheck failed" in str(w.message)]
    assert len(messages) == 1 and f"{check.measured:.4f}" in messages[0] and "2.3026" in messages[0]


def test_init_loss_label_smoothing_still_expects_ln_c(tmp_path):
    # Uniform predictions against smoothed targets: -sum_k q_k log(1/C) = ln C exactly.
    check = InitLossCheck(on_fail="raise")
    fit(tmp_path, SmoothedClassifier(smoothing=0.3), [check])
    assert check.passed is True
    assert check.measured == pytest.approx(LN10, abs=1e-5)


def test_init_loss_regression_model_is_skipped_with_reason(tmp_path, caplog):
    check = InitLossCheck(on_fail="raise")
    with caplog.at_level("INFO"):
        fit(tmp_path, Regressor(), [check])
    assert check.passed is None and check.measured is None
    assert "1 output" in check.skip_reason and "regression" in check.skip_reason
    assert "InitLossCheck skipped" in caplog.text


def test_init_loss_crank_up_regularization(tmp_path):
    check = InitLossCheck(regularization_factor=100, on_fail="raise")
    fit(tmp_path, PenalizedClassifier(l2=1e-3), [check])
    assert check.passed is True and check.regularization_passed is True
    with pytest.raises(SanityCheckError, match="cranking up regularization did not raise the loss"):
        fit(tmp_path, PenalizedClassifier(l2=1e-3, honest=False), [InitLossCheck(on_fail="raise")])


def test_missing_interface_members_are_named_with_what_replaces_them(tmp_path, caplog):
    with caplog.at_level("INFO"):
        fit(tmp_path, PlainClassifier(), [InitLossCheck(), OverfitTinyBatch(max_steps=2)])
    plain = caplog.text
    caplog.clear()
    with caplog.at_level("INFO"):
        fit(tmp_path, PenalizedClassifier(l2=1e-3), [InitLossCheck()])
    penalized = caplog.text
    for callback in ("InitLossCheck", "OverfitTinyBatch"):
        assert f"{callback}: PlainClassifier does not implement `data_loss`" in plain
        assert f"{callback}: PlainClassifier does not implement `regularization_scaled`" in plain
    assert "does not implement `penalty`, `regularization_scaled`" in plain
    assert "more regularization raises the loss is skipped" in plain
    assert "ModuleInterface" in plain
    # a module with penalty() and regularization_scaled() is only told about the missing data_loss
    assert "PenalizedClassifier does not implement `data_loss`" in penalized
    assert "`regularization_scaled`" not in penalized and "`penalty`" not in penalized


def test_init_loss_state_survives_checkpoint_and_resume_does_not_rerun(tmp_path):
    L.seed_everything(0)
    check = InitLossCheck()
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True)
    fit(tmp_path, PlainClassifier(), [check, ckpt], enable_checkpointing=True)
    saved = torch.load(tmp_path / "last.ckpt", weights_only=True)["callbacks"][check.state_key]
    assert saved["measured"] == check.measured and saved["passed"] is True
    resumed = InitLossCheck()
    model = PlainClassifier()
    train, _ = digits_loaders(batch_size=32, n_train=256)
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path), max_steps=2, callbacks=[resumed])
    with torch.no_grad():  # a resumed run must not be judged as if at init
        model.net[-1].weight.mul_(100)
    trainer.fit(model, train, ckpt_path=str(tmp_path / "last.ckpt"))
    assert resumed.measured == check.measured and resumed.passed is True


# ------------------------------------------------------------------------------------ OverfitTinyBatch


def test_overfit_healthy_model_passes_in_the_reference_number_of_steps(tmp_path):
    L.seed_everything(0)
    model = PlainClassifier(lr=0.1)
    reference = copy.deepcopy(model)
    x, y = digits_tensors(20)
    opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9)
    steps = None
    for step in range(201):
        opt.zero_grad()
        logits = reference(x)
        if (logits.argmax(1) == y).all():
            steps = step
            break
        F.cross_entropy(logits, y).backward()
        opt.step()
    assert steps is not None and steps > 0
    check = OverfitTinyBatch(num_samples=20, on_fail="raise")
    fit(tmp_path, model, [check])
    assert check.passed is True and check.steps == steps and check.final_accuracy == 1.0


def test_overfit_detached_layer_fails_and_names_it(tmp_path):
    with pytest.raises(SanityCheckError, match=r"got no gradient: net\.1\.weight, net\.1\.bias") as err:
        fit(tmp_path, DetachedBody(), [OverfitTinyBatch(max_steps=50, on_fail="raise")])
    assert "accuracy is" in str(err.value)
    check = OverfitTinyBatch(max_steps=50)
    with pytest.warns(UserWarning, match="OverfitTinyBatch failed"):
        fit(tmp_path, DetachedBody(), [check])
    assert check.passed is False and check.steps is None and check.final_accuracy < 1.0


def test_overfit_fully_detached_graph_fails_before_backward(tmp_path):
    with pytest.raises(SanityCheckError, match="does not depend on any trainable parameter"):
        fit(tmp_path, FullyDetached(), [OverfitTinyBatch(on_fail="raise")])


def test_overfit_restores_everything_bit_for_bit(tmp_path):
    L.seed_everything(0)
    before, after = Snapshot(prime_optimizer=True), Snapshot()
    check = OverfitTinyBatch(num_samples=20, on_fail="raise")
    fit(tmp_path, BNClassifier(), [before, check, after], shuffle=True)
    assert check.passed is True and check.steps > 0
    assert before.state["optimizers"][0]["state"], "momentum buffers must exist before the check"
    assert_same(before.state, after.state)


def test_optimizer_snapshot_restores_in_place():
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    groups, expected = opt.param_groups[0], copy.deepcopy(opt.state_dict())
    snap = OptimizerSnapshot(opt)
    opt.param_groups[0]["lr"], opt.param_groups[0]["weight_decay"] = 1.0, 0.0
    opt.step()
    opt.step()
    snap.restore()
    assert opt.param_groups[0] is groups
    assert_same(expected, opt.state_dict())


def test_checks_do_not_change_the_real_run_or_fire_other_callbacks(tmp_path):
    def run(with_checks: bool):
        L.seed_everything(0)
        model, counter = BNClassifier(), HookCounter()
        checks = [InitLossCheck(on_fail="raise"), OverfitTinyBatch(on_fail="raise")] if with_checks else []
        fit(tmp_path, model, [*checks, counter], max_steps=12, shuffle=True)
        return model, counter.counts

    plain, plain_counts = run(False)
    checked, checked_counts = run(True)
    assert (
        checked_counts
        == plain_counts
        == {"batch_start": 12, "before_backward": 12, "before_optimizer_step": 12}
    )
    assert_same(dict(plain.state_dict()), dict(checked.state_dict()))


# ------------------------------------------------------------------------------------ project recipe


def test_checks_on_the_project_classifier_and_datamodule(tmp_path):
    from lightning_tricks.datamodules.digits import DigitsDataModule
    from lightning_tricks.recipes.classifier import ImageClassifier
    from lightning_tricks.recipes.regularization import RegularizationConfig

    L.seed_everything(0)
    model = ImageClassifier(
        model="small_cnn",
        in_channels=1,
        regularization=RegularizationConfig(l2=1e-3, label_smoothing=0.1, dropout=0.3),
    )
    dm = DigitsDataModule(batch_size=32, augment="flip")
    before, after = Snapshot(), Snapshot()
    init_check = InitLossCheck(on_fail="raise")
    overfit = OverfitTinyBatch(on_fail="raise")
    trainer = L.Trainer(
        **quiet_trainer_kwargs(tmp_path),
        max_steps=1,
        limit_val_batches=0,
        callbacks=[before, init_check, overfit, after],
    )
    trainer.fit(model, datamodule=dm)
    assert init_check.passed is True and init_check.regularization_passed is True
    assert overfit.passed is True and overfit.steps > 0
    assert_same(before.state, after.state)


class TransferScaled(PlainClassifier):
    """Transforms batches in ``on_after_batch_transfer``, as in-memory DataModules do."""

    def on_after_batch_transfer(self, batch, dataloader_idx):
        x, y = batch
        return x * 5.0 - 1.0, y


def test_init_loss_sees_batches_after_the_transfer_hooks(tmp_path):
    L.seed_everything(0)
    model = TransferScaled()
    x, y = digits_tensors(64)
    with torch.no_grad():
        transformed = float(F.cross_entropy(model(x * 5.0 - 1.0), y))
        raw = float(F.cross_entropy(model(x), y))
    check = InitLossCheck(num_batches=2)
    fit(tmp_path, model, [check])
    assert abs(transformed - raw) > 1e-3
    assert check.measured == pytest.approx(transformed, rel=1e-5)


# ------------------------------------------------------------------------------------ DDP


class RankReport(Callback):
    """Writes each rank's verdicts to ``rank{r}.json`` as training starts."""

    def __init__(self, directory, init_check, overfit):
        self.directory, self.init_check, self.overfit = str(directory), init_check, overfit

    def on_train_start(self, trainer, pl_module):
        report = {
            "measured": self.init_check.measured,
            "passed": self.init_check.passed,
            "overfit_passed": self.overfit.passed,
            "overfit_steps": self.overfit.steps,
        }
        Path(self.directory, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def seeded_classifier() -> PlainClassifier:
    L.seed_everything(0)
    return PlainClassifier()


def init_checks_on_two_ranks(directory):
    init_check, overfit = InitLossCheck(num_batches=4), OverfitTinyBatch()
    model = seeded_classifier()
    train, _ = digits_loaders(batch_size=32, n_train=512)
    trainer = L.Trainer(
        **ddp_trainer_kwargs(directory),
        max_steps=1,
        callbacks=[init_check, overfit, RankReport(directory, init_check, overfit)],
    )
    trainer.fit(model, train)


@pytest.mark.ddp(scenario=init_checks_on_two_ranks)
def test_ddp_ranks_agree_and_reduce_the_init_loss(ddp_scenario):
    model = seeded_classifier()  # the weights the scenario starts from
    x, y = digits_tensors(512)
    # Lightning gives each rank a shuffling DistributedSampler (seed 0); the check sees 4 batches of 32
    # on each rank, and the reduced loss is the mean over all 256 samples.
    dataset = torch.utils.data.TensorDataset(x, y)
    shards = [
        list(DistributedSampler(dataset, num_replicas=2, rank=r, shuffle=True, seed=0))[:128] for r in (0, 1)
    ]
    idx = torch.tensor(shards[0] + shards[1])
    with torch.no_grad():
        expected = float(F.cross_entropy(model(x[idx]), y[idx]))
    reports = [json.loads((ddp_scenario.directory / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert reports[0] == reports[1]
    assert reports[0]["passed"] is True and reports[0]["measured"] == pytest.approx(expected, rel=1e-5)
    assert reports[0]["overfit_passed"] is True and reports[0]["overfit_steps"] > 0
