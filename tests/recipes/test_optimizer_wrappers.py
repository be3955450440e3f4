"""Lookahead (timm's) and SAM (hand-written) against their papers' updates, and inside Lightning runs."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from helpers import ddp_trainer_kwargs, quiet_trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import MixedPrecision
from torch import nn
from torch.nn import functional as F

from lightning_tricks.callbacks import LRFinder, OptimizerSwitch
from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.recipes import ImageClassifier, OptimizerConfig, SchedulerConfig
from lightning_tricks.recipes.optim import build_optimizer
from lightning_tricks.recipes.optim_wrappers import innermost
from lightning_tricks.recipes.sam import SAM
from lightning_tricks.recipes.schedules import build_scheduler


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(200 + step)
    return torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def _loss(model: nn.Module, step: int) -> torch.Tensor:
    x, y = _batch(step)
    return F.cross_entropy(model(x), y)


def _grads(model: nn.Module, step: int) -> list[torch.Tensor]:
    return list(torch.autograd.grad(_loss(model, step), list(model.parameters())))


def _closure(model: nn.Module, optimizer: torch.optim.Optimizer, step: int):
    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = _loss(model, step)
        loss.backward()
        return loss

    return closure


def test_lookahead_matches_slow_and_fast_weights_of_zhang_et_al_2019() -> None:
    lr, k, alpha, steps = 0.3, 3, 0.5, 8
    model = _net()
    optimizer = build_optimizer(
        model, OptimizerConfig(name="sgd", lr=lr, momentum=0.0, lookahead={"k": k, "alpha": alpha})
    )
    for step in range(steps):
        optimizer.step(_closure(model, optimizer, step))
    reference = _net()
    fast = [p.detach().clone() for p in reference.parameters()]
    slow = [p.clone() for p in fast]  # phi_0 = theta_0
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p, w in zip(reference.parameters(), fast, strict=True):
                p.copy_(w)
        for w, g in zip(fast, _grads(reference, step - 1), strict=True):
            w -= lr * g  # the inner optimizer: plain gradient descent
        if step % k == 0:  # phi <- phi + alpha (theta - phi); theta <- phi
            for w, s in zip(fast, slow, strict=True):
                s += alpha * (w - s)
                w.copy_(s)
    for got, want in zip(model.parameters(), fast, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-5, atol=1e-7)
    # the slow weights are in the optimizer state (and so in its state_dict)
    state = optimizer.state_dict()
    assert all("lookahead_slow_buff" in s for s in state["state"].values())
    assert [g["lookahead_step"] for g in state["param_groups"]] == [steps] * len(state["param_groups"])
    assert optimizer.state is innermost(optimizer).state


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_the_perturbed_gradient_update_of_foret_et_al_2021(adaptive: bool) -> None:
    lr, rho, steps = 0.2, 0.1, 4
    model = _net()
    optimizer = build_optimizer(
        model, OptimizerConfig(name="sgd", lr=lr, momentum=0.0, sam={"rho": rho, "adaptive": adaptive})
    )
    losses = [float(optimizer.step(_closure(model, optimizer, step)).detach()) for step in range(steps)]
    reference = _net()
    for step in range(steps):
        weights = [p.detach().clone() for p in reference.parameters()]
        g = _grads(reference, step)
        assert float(_loss(reference, step).detach()) == pytest.approx(losses[step], rel=1e-6)  # loss at w
        # e = rho * g / ||g||  (ASAM: e = rho * w^2 g / ||w g||), norms over all parameters
        scale = [w.abs() if adaptive else torch.ones_like(w) for w in weights]
        norm = torch.sqrt(sum(((s * gi) ** 2).sum() for s, gi in zip(scale, g, strict=True)))
        with torch.no_grad():
            for p, s, gi in zip(reference.parameters(), scale, g, strict=True):
                p += rho * s * s * gi / norm
        g_sharp = _grads(reference, step)  # gradient at w + e
        with torch.no_grad():
            for p, w, gi in zip(reference.parameters(), weights, g_sharp, strict=True):
                p.copy_(w - lr * gi)  # the update is made from w, with the gradient at w + e
    for got, want in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)
    assert not optimizer.perturbed


def test_sam_refuses_a_step_without_closure() -> None:
    model = _net()
    optimizer = SAM(torch.optim.SGD(model.parameters(), lr=0.1))
    _loss(model, 0).backward()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="SAM needs the closure"):
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("wrappers", [{"lookahead": {"k": 2}}, {"sam": {"rho": 0.05}, "lookahead": {}}])
def test_warmup_and_schedule_drive_wrapped_optimizers_like_plain_ones(wrappers: dict) -> None:
    config = SchedulerConfig(name="cosine", interval="step", warmup=3)
    lrs = []
    for extra in ({}, wrappers):
        model = _net()
        optimizer = build_optimizer(model, OptimizerConfig(name="sgd", lr=0.1, **extra))
        scheduler = build_scheduler(optimizer, config, total_steps=10, steps_per_epoch=10)["scheduler"]
        seen = []
        for step in range(10):
            optimizer.step(_closure(model, optimizer, step))
            scheduler.step()
            seen.append([g["lr"] for g in innermost(optimizer).param_groups])
        lrs.append(seen)
    assert lrs[0] == lrs[1]
    assert lrs[0][0][0] < lrs[0][2][0]  # warm-up rises


# -- inside Lightning --------------------------------------------------------------------------------
def _digits(**kwargs) -> DigitsDataModule:
    return DigitsDataModule(batch_size=32, image_size=8, **kwargs)


def _trainer(tmp_path, **kwargs) -> L.Trainer:
    base = quiet_trainer_kwargs(tmp_path)
    base.update(limit_train_batches=3, limit_val_batches=0, max_epochs=1, num_sanity_val_steps=0)
    base.update(kwargs)
    return L.Trainer(**base)


class _BatchRecorder(L.Callback):
    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.counted: list[int] = []  # samples in the epoch's running training loss after each batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batches.append((batch[0].clone(), batch[1].clone()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.counted.append(int(pl_module.train_loss.weight))


def test_sam_in_lightning_automatic_optimization_matches_the_update_by_hand(tmp_path) -> None:
    lr, rho = 0.05, 0.05
    L.seed_everything(0)
    module = ImageClassifier(
        "small_cnn", num_classes=10, in_channels=1,
        optimizer=OptimizerConfig(name="sgd", lr=lr, momentum=0.0, sam={"rho": rho}),
    )  # fmt: skip
    start = copy.deepcopy(module.net)
    recorder = _BatchRecorder()
    _trainer(tmp_path, callbacks=[recorder]).fit(module, _digits())
    reference = start.train()
    for x, y in recorder.batches:
        weights = [p.detach().clone() for p in reference.parameters()]
        g = torch.autograd.grad(F.cross_entropy(reference(x), y), list(reference.parameters()))
        norm = torch.sqrt(sum((gi**2).sum() for gi in g))
        running = {n: b.clone() for n, b in reference.named_buffers()}
        with torch.no_grad():
            for p, gi in zip(reference.parameters(), g, strict=True):
                p += rho * gi / norm
        g_sharp = torch.autograd.grad(F.cross_entropy(reference(x), y), list(reference.parameters()))
        with torch.no_grad():
            for p, w, gi in zip(reference.parameters(), weights, g_sharp, strict=True):
                p.copy_(w - lr * gi)
            for n, b in reference.named_buffers():  # BatchNorm statistics: the first pass only
                if not n.endswith("num_batches_tracked"):
                    b.copy_(running[n])
    for (name, got), want in zip(
        module.net.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        if not name.endswith("num_batches_tracked"):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)
    # each step counted once in the epoch's training metrics
    assert recorder.counted == [32, 64, 96]


def _resume_run(tmp_path, optimizer: OptimizerConfig) -> None:
    """Two epochs straight, and one epoch + resume from its checkpoint: identical weights and optimizer."""

    def fit(root, epochs: int, ckpt_path=None) -> tuple[ImageClassifier, L.Trainer]:
        L.seed_everything(0)
        module = ImageClassifier("small_cnn", num_classes=10, in_channels=1, optimizer=optimizer)
        checkpoint = ModelCheckpoint(dirpath=root, save_last=True)
        trainer = _trainer(root, max_epochs=epochs, enable_checkpointing=True, callbacks=[checkpoint])
        trainer.fit(module, _digits(), ckpt_path=ckpt_path)
        return module, trainer

    straight, straight_trainer = fit(tmp_path / "straight", 2)
    fit(tmp_path / "first", 1)
    resumed, resumed_trainer = fit(tmp_path / "resumed", 2, ckpt_path=tmp_path / "first" / "last.ckpt")
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    a, b = straight_trainer.optimizers[0].state_dict(), resumed_trainer.optimizers[0].state_dict()
    assert a["param_groups"] == b["param_groups"]
    for key in a["state"]:
        for name, value in a["state"][key].items():
            torch.testing.assert_close(value, b["state"][key][name], rtol=0, atol=0)
    return straight_trainer.optimizers[0]


def test_lookahead_resumes_from_a_checkpoint_as_if_never_stopped(tmp_path) -> None:
    optimizer = _resume_run(tmp_path, OptimizerConfig(name="sgd", lr=0.05, lookahead={"k": 2}))
    assert any("lookahead_slow_buff" in s for s in optimizer.state_dict()["state"].values())
    assert optimizer.param_groups[0]["lookahead_step"] == 6  # 2 epochs x 3 steps: k=2 puts resume mid-cycle


def test_sam_resumes_from_a_checkpoint_as_if_never_stopped(tmp_path) -> None:
    optimizer = _resume_run(tmp_path, OptimizerConfig(name="adamw", lr=1e-3, sam={"rho": 0.05}))
    assert isinstance(optimizer, SAM) and optimizer.param_groups[0]["sam_rho"] == 0.05
    assert all("exp_avg" in s for s in optimizer.state_dict()["state"].values())  # AdamW's state is saved


class _StateProbe(L.Callback):
    state_at_first_step: int | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.state_at_first_step is None:
            self.state_at_first_step = len(trainer.optimizers[0].state)


def test_lr_finder_and_optimizer_switch_work_on_wrapped_optimizers(tmp_path) -> None:
    L.seed_everything(0)
    module = ImageClassifier(
        "small_cnn", num_classes=10, in_channels=1,
        optimizer=OptimizerConfig(name="adam", lr=1e-3, sam={"rho": 0.05}, lookahead={"k": 2}),
    )  # fmt: skip
    finder = LRFinder(num_steps=10, apply=False, plot=False, divergence_factor=None)
    switch = OptimizerSwitch(switch_epoch=1, momentum=0.9)
    probe = _StateProbe()
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[finder, switch, probe], limit_train_batches=2)
    trainer.fit(module, _digits())
    assert len(finder.results.lrs) == 10  # the range test stepped SAM with a closure
    assert probe.state_at_first_step == 0  # and left no optimizer state (slow weights, moments) behind
    optimizer = module.trainer.optimizers[0]
    assert optimizer.defaults["lookahead_k"] == 2  # Lookahead(SAM(SGD)) after the switch
    assert isinstance(optimizer._base_optimizer, SAM)
    assert isinstance(innermost(optimizer), torch.optim.SGD)
    assert optimizer.param_groups[0]["lookahead_step"] == 2  # one epoch on the new optimizer


@pytest.mark.parametrize(
    ("trainer_kwargs", "match"),
    [
        # on CPU Lightning turns precision="16-mixed" into bf16; the plugin keeps fp16 with a GradScaler
        (
            {"plugins": [MixedPrecision("16-mixed", "cpu")]},
            r"optimizer.sam.*precision='16-mixed'.*bf16-mixed",
        ),
        ({"accumulate_grad_batches": 2}, r"optimizer.sam.*gradient accumulation \(2 batches"),
    ],
)
def test_sam_refuses_gradscaler_and_accumulation_before_training(tmp_path, trainer_kwargs, match) -> None:
    module = ImageClassifier("small_cnn", num_classes=10, in_channels=1, optimizer={"name": "sgd", "sam": {}})
    before = copy.deepcopy(module.net.state_dict())
    with pytest.raises(ValueError, match=match):
        _trainer(tmp_path, **trainer_kwargs).fit(module, _digits())
    assert all(torch.equal(before[k], v) for k, v in module.net.state_dict().items())


def test_optimizer_switch_from_lamb_asks_for_an_sgd_rate(tmp_path) -> None:
    """LAMB's steps are trust-ratio scaled, so the Adam-equivalent SGD rate would be wrong."""
    module = ImageClassifier("small_cnn", num_classes=10, in_channels=1, optimizer={"name": "lamb"})
    trainer = _trainer(tmp_path, max_epochs=2, callbacks=[OptimizerSwitch(switch_epoch=1)])
    with pytest.raises(ValueError, match=r"the optimizer is Lamb; pass `sgd_lr`"):
        trainer.fit(module, _digits())


def _sam_linear() -> ImageClassifier:
    L.seed_everything(0)
    return ImageClassifier(
        "linear", num_classes=10, in_channels=1, model_kwargs={"input_size": 8},
        optimizer=OptimizerConfig(name="sgd", lr=0.5, momentum=0.0, sam={"rho": 0.05}),
    )  # fmt: skip


def _fit_sam_linear(batch_size: int, **trainer_kwargs) -> ImageClassifier:
    module = _sam_linear()
    data = DigitsDataModule(batch_size=batch_size, image_size=8)
    L.Trainer(limit_train_batches=3, limit_val_batches=0, max_epochs=1, **trainer_kwargs).fit(module, data)
    return module


def sam_on_two_ranks(directory) -> dict[str, torch.Tensor]:
    """Returns this rank's trained weights."""
    return _fit_sam_linear(16, **ddp_trainer_kwargs(directory)).state_dict()


@pytest.mark.ddp(scenario=sam_on_two_ranks)
def test_sam_under_ddp_equals_one_process_on_the_global_batch(ddp_scenario, tmp_path) -> None:
    """Both gradients of a SAM step are averaged over the ranks (the second backward syncs too)."""
    ddp = ddp_scenario.results[0]
    single = _fit_sam_linear(32, **quiet_trainer_kwargs(tmp_path / "single"))
    assert not torch.allclose(single.net.classifier.weight, _sam_linear().net.classifier.weight)
    for (name, a), b in zip(ddp.items(), single.state_dict().values(), strict=True):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


def test_sam_runs_under_bf16_autocast_like_in_float32(tmp_path) -> None:
    """bf16-mixed has no GradScaler, so Lightning passes SAM its closure (run under autocast)."""
    bf16 = _fit_sam_linear(32, **quiet_trainer_kwargs(tmp_path / "bf16"), precision="bf16-mixed")
    fp32 = _fit_sam_linear(32, **quiet_trainer_kwargs(tmp_path / "fp32"))
    start = _sam_linear().net.classifier.weight
    moved = (fp32.net.classifier.weight - start).norm()
    assert moved > 0.1
    assert (bf16.net.classifier.weight - fp32.net.classifier.weight).norm() < 0.05 * moved


def test_sam_settings_never_meet_the_base_optimizers_own_keys() -> None:
    optimizer = build_optimizer(_net(), OptimizerConfig(name="adadelta", sam={"rho": 0.1}))
    assert all((g["rho"], g["sam_rho"]) == (0.95, 0.1) for g in optimizer.param_groups)  # Adadelta's rho kept
