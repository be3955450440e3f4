"""EMA callback: the average against an independent reference, validation of both weights, resume, DDP."""

from __future__ import annotations

import copy
import itertools
import pickle
from pathlib import Path

import cloudpickle
import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from helpers import PlainClassifier, ddp_trainer_kwargs, digits_loaders, quiet_trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins import TorchSyncBatchNorm
from timm.utils.model_ema import ModelEmaV3
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm
from torch_ema import ExponentialMovingAverage
from torchmetrics import MeanMetric

from lightning_tricks.callbacks.ema import EMA


class BatchNormClassifier(PlainClassifier):
    """PlainClassifier with a BatchNorm layer, so buffers (float and int) take part."""

    def __init__(self, lr: float = 0.1) -> None:
        super().__init__(lr=lr)
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 10)
        )


class StepRecorder(Callback):
    """Records the live parameters and buffers after every optimizer step."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []
        self._step = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self._step:  # an optimizer step happened (gradient accumulation)
            self._step = trainer.global_step
            self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


def library_ema(
    template: nn.Module,
    updates: list[dict[str, torch.Tensor]],
    warmup: str | None,
    decay: float,
    buffers: bool,
) -> dict[str, torch.Tensor]:
    """The average of the live states ``updates`` (one per EMA update) computed by an independent library:
    torch-ema's ``ExponentialMovingAverage(use_num_updates=True)`` for ``warmup="num_updates"``, timm's
    ``ModelEmaV3`` otherwise (``use_warmup=True`` is the ``"power"`` warm-up). Both start from a copy of
    the first state; integer buffers, and float buffers when ``buffers`` is false, are copied."""
    first, rest = updates[0], updates[1:]
    if warmup == "num_updates":
        params = {name for name, _ in template.named_parameters()}
        names = [k for k, v in first.items() if v.is_floating_point() and (buffers or k in params)]
        ema = ExponentialMovingAverage([first[k] for k in names], decay=decay, use_num_updates=True)
        for live in rest:
            ema.update([live[k] for k in names])
        return {**updates[-1], **dict(zip(names, ema.shadow_params, strict=True))}
    model = copy.deepcopy(template)
    model.load_state_dict(first)
    ema = ModelEmaV3(model, decay=decay, use_warmup=warmup == "power", exclude_buffers=not buffers)
    for t, live in enumerate(rest, start=1):
        model.load_state_dict(live)
        ema.update(model, step=t + 1)  # timm counts from step 1, which copies; step t+1 is our update t
    return ema.module.state_dict()


def evaluate(model: nn.Module, loader) -> tuple[float, float]:
    """Accuracy and mean cross-entropy over a loader, weighted by batch size."""
    model.eval()
    correct, loss, n = 0.0, 0.0, 0
    with torch.no_grad():
        for x, y in loader:
            logits = model(x)
            correct += (logits.argmax(1) == y).float().sum().item()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            n += len(y)
    return correct / n, loss / n


def fit(tmp_path, model, callbacks, max_epochs=2, n_train=600, shuffle=False, ckpt_path=None, **kwargs):
    train, val = digits_loaders(batch_size=64, n_train=n_train, shuffle=shuffle)
    trainer = L.Trainer(
        **{**quiet_trainer_kwargs(tmp_path), **kwargs}, max_epochs=max_epochs, callbacks=callbacks
    )
    trainer.fit(model, train, val, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize(
    ("warmup", "every", "start", "average_buffers", "bn", "accumulate"),
    [
        (None, 1, 0, True, False, 1),
        ("num_updates", 3, 5, True, True, 1),
        ("power", 2, 1, False, True, 1),
        ("num_updates", 1, 2, True, False, 2),
    ],
)
def test_ema_matches_timm_and_torch_ema(tmp_path, warmup, every, start, average_buffers, bn, accumulate):
    torch.manual_seed(0)
    model = BatchNormClassifier() if bn else PlainClassifier()
    recorder = StepRecorder()
    ema = EMA(
        decay=0.8,
        warmup=warmup,
        update_every_n_steps=every,
        start_step=start,
        average_buffers=average_buffers,
        copy_average_at_end=False,
    )
    fit(tmp_path, model, [recorder, ema], limit_val_batches=1, accumulate_grad_batches=accumulate)

    # 600 samples / 64 per batch = 10 batches per epoch, one optimizer step per `accumulate` batches
    n_steps = 20 // accumulate
    assert len(recorder.states) == n_steps
    updates = [live for i, live in enumerate(recorder.states) if i >= start and (i - start) % every == 0]
    template = BatchNormClassifier() if bn else PlainClassifier()
    reference = library_ema(template, updates, warmup, 0.8, average_buffers)

    assert ema.num_updates == len(updates) == len(range(start, n_steps, every))
    ours = ema.ema_state_dict()
    assert ours.keys() == reference.keys()
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=0, atol=1e-6, msg=name)
    # copy_average_at_end=False leaves the raw weights of the last step in the model.
    for name, value in model.state_dict().items():
        assert torch.equal(value, recorder.states[-1][name]), name
    if bn:
        copied = torch.equal(ours["net.2.running_mean"], recorder.states[-1]["net.2.running_mean"])
        assert copied == (not average_buffers)


class ValidationProbe(Callback):
    """Checks the weights around each validation and evaluates raw and EMA weights independently."""

    def __init__(self, ema: EMA, val_loader) -> None:
        self.ema = ema
        self.val_loader = val_loader
        self.rows: list[dict[str, float]] = []

    def on_validation_epoch_start(self, trainer, pl_module):
        self.before = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_validation_epoch_end(self, trainer, pl_module):  # runs after EMA's (later in the list)
        for name, value in pl_module.state_dict().items():
            assert torch.equal(value, self.before[name]), name

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
        raw = copy.deepcopy(pl_module).cpu()
        averaged = copy.deepcopy(pl_module).cpu()
        averaged.load_state_dict(self.ema.ema_state_dict())
        metrics["own/acc"], metrics["own/loss"] = evaluate(raw, self.val_loader)
        metrics["own/acc_ema"], metrics["own/loss_ema"] = evaluate(averaged, self.val_loader)
        self.rows.append(metrics)


def test_validation_logs_raw_and_ema_metrics_and_keeps_live_weights(tmp_path):
    torch.manual_seed(0)
    model = PlainClassifier(lr=0.2)
    ema = EMA(decay=0.9, copy_average_at_end=False)
    _, val = digits_loaders(n_train=600)
    probe = ValidationProbe(ema, list(itertools.islice(val, 2)))  # the EMA pass honours the limit too
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc_ema", mode="max", save_top_k=1)
    trainer = fit(
        tmp_path, model, [ema, probe, best], max_epochs=3, enable_checkpointing=True, limit_val_batches=2
    )

    assert len(probe.rows) == 3
    for row in probe.rows:
        assert row["val/acc"] == pytest.approx(row["own/acc"], abs=1e-6)
        assert row["val/loss"] == pytest.approx(row["own/loss"], abs=1e-5)
        assert row["val/acc_ema"] == pytest.approx(row["own/acc_ema"], abs=1e-6)
        assert row["val/loss_ema"] == pytest.approx(row["own/loss_ema"], abs=1e-5)
        assert row["val/loss_ema"] != pytest.approx(row["val/loss"], abs=1e-4)
    assert float(best.best_model_score) == pytest.approx(max(r["val/acc_ema"] for r in probe.rows))

    # Outside fit a checkpoint's model is its EMA: `test(ckpt_path="best")` must not reload the raw weights.
    ckpt = torch.load(best.best_model_path, weights_only=True)
    trainer.test(model, dataloaders=val, ckpt_path="best", verbose=False)
    for name, value in model.state_dict().items():
        assert torch.equal(value, ckpt["state_dict"][name]), name
    assert not torch.equal(ckpt["state_dict"]["net.1.weight"], ckpt["current_model_state"]["net.1.weight"])


def test_ema_pass_leaves_training_rng_and_raw_weights_unchanged(tmp_path):
    """Shuffled loader + EMA validation pass: raw training is bit-identical to a run without EMA."""
    torch.manual_seed(0)
    plain = PlainClassifier()
    with_ema = copy.deepcopy(plain)
    torch.manual_seed(1)
    fit(tmp_path / "a", plain, [], shuffle=True)
    torch.manual_seed(1)
    ema = EMA(decay=0.9, copy_average_at_end=False)
    fit(tmp_path / "b", with_ema, [ema], shuffle=True)
    assert ema.num_updates == 20
    for (name, a), b in zip(plain.state_dict().items(), with_ema.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class MetricValues(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def test_no_swap_before_first_update_and_ema_metrics_equal_raw(tmp_path):
    torch.manual_seed(0)
    model = PlainClassifier()
    ema = EMA(decay=0.9, start_step=25, copy_average_at_end=False)
    values, recorder = MetricValues(), StepRecorder()
    # monitoring val/acc_ema must work from the first epoch on, before the EMA exists
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc_ema", mode="max")
    with pytest.raises(RuntimeError, match="no average yet"):
        ema.ema_state_dict()
    fit(
        tmp_path,
        model,
        [recorder, ema, values, best],
        max_epochs=3,
        limit_val_batches=1,
        enable_checkpointing=True,
    )
    assert ema.num_updates == 5  # steps 25..29
    # Epochs 0 and 1: the EMA model is the raw model (a swap to the never-updated initial weights
    # would give near-chance accuracy and a different loss).
    for row in values.rows[:2]:
        assert row["val/acc_ema"] == row["val/acc"]
        assert row["val/loss_ema"] == row["val/loss"]
    assert values.rows[2]["val/loss_ema"] != values.rows[2]["val/loss"]
    assert float(best.best_model_score) == max(r["val/acc_ema"] for r in values.rows)

    # Never reached: nothing is swapped or copied and a checkpoint holds the raw weights.
    torch.manual_seed(0)
    model = PlainClassifier()
    late, recorder = EMA(decay=0.9, start_step=1000), StepRecorder()
    trainer = fit(tmp_path / "late", model, [recorder, late], max_epochs=1)
    assert late.num_updates == 0
    for name, value in model.state_dict().items():
        assert torch.equal(value, recorder.states[-1][name]), name
    trainer.save_checkpoint(tmp_path / "late.ckpt")
    ckpt = torch.load(tmp_path / "late.ckpt", weights_only=True)
    for name, value in ckpt["state_dict"].items():
        assert torch.equal(value, recorder.states[-1][name]), name
    with pytest.raises(RuntimeError, match="no average yet"), late.swapped():
        pass


class FailingInSecondPass(PlainClassifier):
    """Raises in the first validation_step after the raw pass (the EMA pass), with a metric attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.val_metric = MeanMetric()
        self.calls = 0

    def validation_step(self, batch, batch_idx):
        self.calls += 1
        if self.calls == 3:  # limit_val_batches=2, no sanity check: call 3 is the EMA pass
            raise RuntimeError("boom in validation_step")
        self.val_metric(batch[1].float().mean())
        super().validation_step(batch, batch_idx)


def test_failure_in_ema_pass_restores_weights_logging_and_metrics(tmp_path):
    torch.manual_seed(0)
    model = FailingInSecondPass()
    metric = model.val_metric
    before: dict[str, torch.Tensor] = {}

    class Snapshot(Callback):
        def on_validation_epoch_start(self, trainer, pl_module):
            before.update({k: v.clone() for k, v in pl_module.state_dict().items()})

    ema = EMA(decay=0.9)
    with pytest.raises(RuntimeError, match="boom in validation_step"):
        fit(tmp_path, model, [Snapshot(), ema], max_epochs=1, limit_val_batches=2, num_sanity_val_steps=0)
    assert ema.num_updates == 10
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert "log" not in model.__dict__
    assert model.val_metric is metric


def make_emas() -> list[EMA]:
    return [
        EMA(decay=0.9, warmup="num_updates", update_every_n_steps=3, copy_average_at_end=False),
        EMA(decay=0.95, warmup="power", start_step=4, suffix="_ema95", copy_average_at_end=False),
    ]


def test_resume_matches_uninterrupted_run(tmp_path):
    torch.manual_seed(0)
    initial = BatchNormClassifier()

    full_model, full_emas = copy.deepcopy(initial), make_emas()
    fit(tmp_path / "full", full_model, full_emas, max_epochs=4, limit_val_batches=1)

    first_model, first_emas = copy.deepcopy(initial), make_emas()
    ckpt_cb = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    fit(
        tmp_path / "first",
        first_model,
        [*first_emas, ckpt_cb],
        max_epochs=2,
        enable_checkpointing=True,
        limit_val_batches=1,
    )
    last = tmp_path / "ckpt" / "last.ckpt"

    ckpt = torch.load(last, weights_only=True)
    primary_state = first_emas[0].ema_state_dict()
    for name, value in ckpt["state_dict"].items():
        assert torch.equal(value, primary_state[name]), name
    assert set(ckpt["current_model_state"]) == set(ckpt["state_dict"])
    assert ckpt["state_dict_weights"] == "ema"
    secondary = ckpt["callbacks"][first_emas[1].state_key]
    assert secondary["num_updates"] == first_emas[1].num_updates == 16
    saved = ckpt["state_dict_ema95"]["net.1.weight"]
    assert torch.equal(saved, first_emas[1].ema_state_dict()["net.1.weight"])

    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    resumed_model, resumed_emas = BatchNormClassifier(), make_emas()
    fit(tmp_path / "resumed", resumed_model, resumed_emas, max_epochs=4, ckpt_path=last, limit_val_batches=1)

    resumed_state = resumed_model.state_dict()
    for name, value in full_model.state_dict().items():
        assert torch.equal(value, resumed_state[name]), f"raw {name}"
    for full, resumed in zip(full_emas, resumed_emas, strict=True):
        assert full.num_updates == resumed.num_updates
        a, b = full.ema_state_dict(), resumed.ema_state_dict()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-7, msg=name)


def test_image_classifier_metric_objects_are_not_mixed(tmp_path):
    """ImageClassifier logs torchmetrics objects: the EMA pass must use its own metric state."""
    from lightning_tricks.recipes.classifier import ImageClassifier

    torch.manual_seed(0)
    model = ImageClassifier(model="mlp", num_classes=10, in_channels=1, model_kwargs={"input_size": 8})
    ema = EMA(decay=0.9, copy_average_at_end=False)
    _, val = digits_loaders(n_train=600)
    probe = ValidationProbe(ema, val)
    fit(tmp_path, model, [ema, probe], max_epochs=2)
    for row in probe.rows:
        assert row["val/acc"] == pytest.approx(row["own/acc"], abs=1e-6)
        assert row["val/acc_ema"] == pytest.approx(row["own/acc_ema"], abs=1e-6)


class RankDump(Callback):
    """Saves every rank's EMA and the live weights after each step to ``out/rank{r}.pt``."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.steps: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_end(self, trainer, pl_module):
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        payload = {"ema": ema.ema_state_dict(), "steps": self.steps, "num_updates": ema.num_updates}
        torch.save(payload, Path(self.out) / f"rank{trainer.global_rank}.pt")


def ema_on_two_ranks(directory):
    torch.manual_seed(0)
    model = PlainClassifier()
    train, val = digits_loaders(batch_size=32, n_train=256)
    trainer = L.Trainer(
        **ddp_trainer_kwargs(directory),
        max_epochs=2,
        callbacks=[EMA(decay=0.8, warmup="num_updates", copy_average_at_end=False), RankDump(str(directory))],
    )
    trainer.fit(model, train, val)


@pytest.mark.ddp(scenario=ema_on_two_ranks)
def test_ddp_ema_identical_on_both_ranks(ddp_scenario):
    ranks = [torch.load(ddp_scenario.directory / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert ranks[0]["num_updates"] == ranks[1]["num_updates"] == 8  # 128 samples per rank / 32, 2 epochs
    for name in ranks[0]["ema"]:
        assert torch.equal(ranks[0]["ema"][name], ranks[1]["ema"][name]), name
    reference = library_ema(PlainClassifier(), ranks[0]["steps"], "num_updates", 0.8, buffers=True)
    for name, value in reference.items():
        torch.testing.assert_close(ranks[0]["ema"][name], value, rtol=0, atol=1e-6)


def test_tensor_list_ema_mixed_dtypes_and_copies():
    """bf16 live weights into an fp32 average (as under bf16-true precision), int buffers copied."""
    from lightning_tricks.callbacks._averaging import TensorListEMA

    torch.manual_seed(0)
    average = [torch.randn(5), torch.randn(3, dtype=torch.float64), torch.tensor(3)]
    live = [torch.randn(5).bfloat16(), torch.randn(3, dtype=torch.float64), torch.tensor(7)]
    expected = [0.75 * a + 0.25 * b.to(a.dtype) for a, b in zip(average[:2], live[:2], strict=True)]
    ema = TensorListEMA(average, live)
    ema.update(decay=0.75)
    torch.testing.assert_close(average[0], expected[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(average[1], expected[1], rtol=0, atol=1e-12)
    assert average[2].item() == 7
    live_before, average_before = [t.clone() for t in live], [t.clone() for t in average]
    with ema.average_in_live():
        assert torch.equal(live[0], average[0].bfloat16())
    assert all(torch.equal(a, b) for a, b in zip(live, live_before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(average, average_before, strict=True))


def test_callback_pickles():
    ema = EMA(decay=0.99, warmup="power", device="cpu", start_step=3)
    for dumps, loads in ((pickle.dumps, pickle.loads), (cloudpickle.dumps, cloudpickle.loads)):
        clone = loads(dumps(ema))
        assert (clone.decay, clone.warmup, clone.start_step) == (0.99, "power", 3)
        assert clone.state_key == ema.state_key


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"decay": 1.0}, "`decay` must be a float in \\(0, 1\\), got 1.0"),
        ({"decay": 0}, "`decay`"),
        ({"decay": -0.5}, "`decay`"),
        ({"update_every_n_steps": -1}, "`update_every_n_steps` must be an int >= 1, got -1"),
        ({"update_every_n_steps": 0}, "`update_every_n_steps`"),
        ({"start_step": -2}, "`start_step` must be an int >= 0, got -2"),
        ({"device": "gpu0"}, "`device` must be None, 'cpu'.*got 'gpu0'"),
        ({"device": 1.5}, "`device`"),
        ({"warmup": "linear"}, "`warmup` must be None or one of"),
        ({"warmup_gamma": 0.0}, "`warmup_gamma`"),
        ({"suffix": ""}, "`suffix`"),
        ({"lookahead": 0.0}, r"`lookahead` must be None \(off\) or a float in \(0, 1\].*got 0.0"),
        ({"lookahead": 1.5}, "`lookahead`"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        EMA(**kwargs)


def test_two_instances_need_distinct_suffixes(tmp_path):
    with pytest.raises(ValueError, match="own `suffix`"):
        fit(tmp_path, PlainClassifier(), [EMA(decay=0.9), EMA(decay=0.99)], max_epochs=1)


class GlooSyncBatchNorm(_BatchNorm):
    """Synchronised BatchNorm whose training forward runs on CPU under gloo.

    torch's ``nn.SyncBatchNorm`` cannot: its statistics kernels are CUDA-only and DDP rejects it on
    CPU modules. This one sums ``x``, ``x**2`` and the count over all ranks with a differentiable
    all-reduce and normalises with the global batch mean and biased variance; the running statistics
    move towards the global mean and unbiased variance, as ``nn.SyncBatchNorm`` does. Evaluation is
    plain BatchNorm on the running statistics.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input, got {input.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        c, dims = x.shape[1], [0, *range(2, x.dim())]
        count = torch.full((1,), x.numel() / c, dtype=x.dtype)
        sums = dist_nn.all_reduce(torch.cat([x.sum(dims), x.pow(2).sum(dims), count]))
        n = sums[-1]
        mean = sums[:c] / n
        var = sums[c : 2 * c] / n - mean.pow(2)
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
        shape = [1, c] + [1] * (x.dim() - 2)
        normed = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return normed * self.weight.view(shape) + self.bias.view(shape)


class CPUSyncBatchNorm(TorchSyncBatchNorm):
    """The layer sync of ``Trainer(sync_batchnorm=True)``, with :class:`GlooSyncBatchNorm` layers.

    Layers keep their parameters and buffers; only their class changes, and ``revert`` restores it.
    """

    def apply(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, _BatchNorm) and not isinstance(module, GlooSyncBatchNorm):
                module.unsynced_class = type(module)
                module.__class__ = GlooSyncBatchNorm
        return model

    def revert(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if isinstance(module, GlooSyncBatchNorm):
                module.__class__ = module.__dict__.pop("unsynced_class")
        return model


class SyncBNRankDump(Callback):
    """Per rank, to ``out/rank{r}.pt``: BatchNorm inputs and live state after each step, and the EMA."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.steps: list[dict[str, torch.Tensor]] = []
        self.bn_inputs: list[torch.Tensor] = []
        self.bn_types: list[str] = []

    def _record_input(self, module, args):
        if module.training:
            self.bn_inputs.append(args[0].detach().clone())

    def on_fit_start(self, trainer, pl_module):
        for module in pl_module.modules():
            if isinstance(module, _BatchNorm):
                self.bn_types.append(type(module).__name__)
                module.register_forward_pre_hook(self._record_input)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    def on_train_end(self, trainer, pl_module):
        ema = next(cb for cb in trainer.callbacks if isinstance(cb, EMA))
        payload = {
            "ema": ema.ema_state_dict(),
            "steps": self.steps,
            "bn_inputs": self.bn_inputs,
            "bn_types": self.bn_types,
            "num_updates": ema.num_updates,
        }
        torch.save(payload, Path(self.out) / f"rank{trainer.global_rank}.pt")


def ema_with_sync_batchnorm(directory):
    torch.manual_seed(0)
    train, val = digits_loaders(batch_size=32, n_train=256)  # 4 steps per epoch on each rank
    trainer = L.Trainer(
        **ddp_trainer_kwargs(directory),
        max_epochs=2,
        limit_val_batches=1,
        sync_batchnorm=True,
        plugins=[CPUSyncBatchNorm()],
        callbacks=[EMA(decay=0.8, warmup=None, copy_average_at_end=False), SyncBNRankDump(str(directory))],
    )
    trainer.fit(BatchNormClassifier(), train, val)


@pytest.mark.ddp(scenario=ema_with_sync_batchnorm)
def test_ddp_sync_batchnorm_ema_buffers_identical_on_both_ranks(ddp_scenario):
    """Under ``Trainer(sync_batchnorm=True)`` the EMA averages the synchronised BatchNorm statistics, so
    its buffers are identical on both ranks and equal timm's ``ModelEmaV3`` of the live states.

    What is under test is :class:`EMA` (its copy, buffer averaging and per-rank updates), run by the real
    Trainer, DDP strategy and Lightning's layer-sync hook. Only the synchronising layer is replaced:
    torch's ``nn.SyncBatchNorm`` raises ``ValueError("SyncBatchNorm expected input tensor to be on GPU
    ...")`` for CPU input once a process group exists (its statistics kernels are CUDA-only), so
    :class:`CPUSyncBatchNorm` (a ``TorchSyncBatchNorm`` plugin) swaps in :class:`GlooSyncBatchNorm`,
    which all-reduces the sums over gloo. Part 1 checks that stand-in against the global-batch statistics
    computed here, so the EMA is known to see truly synchronised buffers; part 2 is the claim about EMA.
    """
    r0, r1 = (torch.load(ddp_scenario.directory / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    # Part 1, the test's premise: the stand-in synchronised the live BatchNorm statistics.
    assert r0["bn_types"] == r1["bn_types"] == ["GlooSyncBatchNorm"]
    assert r0["num_updates"] == r1["num_updates"] == len(r0["steps"]) == len(r0["bn_inputs"]) == 8
    # each rank normalises a different half of the data, so unsynchronised statistics would differ
    assert not torch.allclose(r0["bn_inputs"][0].mean(0), r1["bn_inputs"][0].mean(0), atol=1e-2)
    # running statistics of the global batch (both ranks' inputs), from BatchNorm's defaults
    mean, var = torch.zeros(32), torch.ones(32)
    for t, (x0, x1) in enumerate(zip(r0["bn_inputs"], r1["bn_inputs"], strict=True)):
        x = torch.cat([x0, x1])
        mean, var = 0.9 * mean + 0.1 * x.mean(0), 0.9 * var + 0.1 * x.var(0, unbiased=True)
        for r in (r0, r1):
            torch.testing.assert_close(r["steps"][t]["net.2.running_mean"], mean, rtol=0, atol=1e-5)
            torch.testing.assert_close(r["steps"][t]["net.2.running_var"], var, rtol=0, atol=1e-5)
            assert r["steps"][t]["net.2.num_batches_tracked"].item() == t + 1
        for name, value in r0["steps"][t].items():
            assert torch.equal(value, r1["steps"][t][name]), (t, name)

    # Part 2, the claim about EMA: it averaged those buffers identically on both ranks, as timm does.
    assert r0["ema"].keys() == r1["ema"].keys() and "net.2.running_var" in r0["ema"]
    for name, value in r0["ema"].items():
        assert torch.equal(value, r1["ema"][name]), name
    reference = library_ema(BatchNormClassifier(), r0["steps"], None, 0.8, buffers=True)
    assert not torch.allclose(reference["net.2.running_var"], r0["steps"][-1]["net.2.running_var"])
    for name, value in reference.items():
        torch.testing.assert_close(r0["ema"][name], value, rtol=0, atol=1e-6, msg=name)


# ------------------------------------------------------------------ safe defaults and checkpoint rule

CONFIGS = Path(__file__).parents[2] / "configs"


def last_epoch_metrics(metrics_csv: Path) -> dict[str, float]:
    """The last non-empty value of every column of a CSVLogger ``metrics.csv``."""
    import csv

    values: dict[str, float] = {}
    with open(metrics_csv) as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def test_readme_quickstart_with_default_ema_keeps_the_raw_accuracy(tmp_path, caplog):
    """`lightning-tricks fit --config configs/digits.yaml --trainer.callbacks+=EMA`, on a shortened budget.

    Tolerance: the EMA with default arguments must reach the raw weights' accuracy within 1 point.
    Without warm-up (the former default) decay 0.999 over ~40 updates leaves the average at the
    initial weights (chance accuracy), so this fails.
    """
    from lightning_tricks.cli import build_cli

    with caplog.at_level("INFO"), pytest.warns(UserWarning, match=r"EMA\(decay=0.999\) averages over"):
        cli = build_cli(
            [
                "fit",
                "--config",
                str(CONFIGS / "digits.yaml"),
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--trainer.max_epochs=2",
                "--model.init_args.model=small_cnn",
                "--data.init_args.image_size=8",
                "--trainer.callbacks+=EMA",
            ]
        )
    ema = next(cb for cb in cli.trainer.callbacks if isinstance(cb, EMA))
    assert ema.warmup == "num_updates"
    metrics = last_epoch_metrics(Path(cli.trainer.logger.log_dir) / "metrics.csv")
    assert metrics["val/acc"] > 0.8
    assert metrics["val/acc_ema"] >= metrics["val/acc"] - 0.01, metrics

    # The config's ModelCheckpoint monitors val/acc: its file holds the raw weights, the EMA beside them,
    # and `test` after `fit` says it evaluates the raw weights of that checkpoint.
    best = cli.trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["state_dict_weights"] == "raw"
    assert checkpoint["state_dict"].keys() == checkpoint["state_dict_ema"].keys()
    assert f"Testing the raw weights of the best checkpoint {best} (chosen on val/acc" in caplog.text
    test_acc = cli.trainer.callback_metrics["test/acc"].item()
    cli.model.load_state_dict(checkpoint["state_dict"])
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert cli.trainer.callback_metrics["test/acc"].item() == test_acc


def horizon_warnings(tmp_path, ema: EMA) -> list[str]:
    """Warnings raised by a 20-step fit (1280 samples / 64) that mention the EMA horizon."""
    import warnings

    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(tmp_path, PlainClassifier(), [ema], max_epochs=1, n_train=1280, limit_val_batches=1)
    return [str(w.message) for w in caught if "EMA(" in str(w.message)]


def test_horizon_warning_states_a_tiny_share_of_the_first_update_as_measured(tmp_path):
    # horizon 2.5 > 10% of 20 updates; the first update weighs 0.6**19 = 0.0061%, not "0%"
    (message,) = horizon_warnings(tmp_path, EMA(decay=0.6, warmup=None))
    assert f"still makes up {100 * 0.6**19:.2g}% of the final average" in message
    assert "0.0061%" in message


def test_horizon_warning_names_decay_planned_updates_and_fix(tmp_path):
    # 1/(1-0.999) = 1000 updates > 10% of 20: warned, with the largest decay that fits (horizon 2).
    (message,) = horizon_warnings(tmp_path / "a", EMA(decay=0.999, warmup=None))
    assert "EMA(decay=0.999) averages over about 1/(1-decay) = 1000 updates" in message
    assert "more than 10% of the 20 updates this run plans" in message
    assert f"still makes up {0.999**19:.0%} of the final average" in message  # 98%
    assert "Fix: warmup='num_updates', or a smaller decay such as EMA(decay=0.5)" in message

    # With warm-up the message says which decay is reached instead.
    (message,) = horizon_warnings(tmp_path / "b", EMA(decay=0.99, start_step=10, update_every_n_steps=2))
    assert "more than 10% of the 5 updates this run plans" in message
    assert f"at or below {(1 + 4) / (10 + 4):.4g} up to the last update" in message
    assert "no decay fits" not in message and "a smaller decay" not in message  # 10% of 5 < 2 updates

    # Horizon 2 = 10% of 20 updates: no warning.
    assert horizon_warnings(tmp_path / "c", EMA(decay=0.5)) == []


def checkpoints_of(tmp_path, monitors: list[str], **ema_kwargs):
    """One 10-step epoch with EMA and a ModelCheckpoint per monitor; returns model, EMA and checkpoints."""
    torch.manual_seed(0)
    model = PlainClassifier()
    ema = EMA(decay=0.9, copy_average_at_end=False, **ema_kwargs)
    ckpts = [
        ModelCheckpoint(dirpath=tmp_path / f"ckpt{i}", monitor=m, mode="max", save_top_k=1)
        for i, m in enumerate(monitors)
    ]
    trainer = fit(
        tmp_path, model, [ema, *ckpts], max_epochs=1, enable_checkpointing=True, limit_val_batches=2
    )
    return trainer, model, ema, [torch.load(c.best_model_path, weights_only=True) for c in ckpts]


@pytest.mark.parametrize(
    ("monitor", "kwargs", "holds"),
    [
        ("val/acc", {}, "raw"),
        ("val/acc_ema", {}, "ema"),
        ("val/acc", {"checkpoint_weights": "ema"}, "ema"),
        ("val/acc_ema", {"checkpoint_weights": "raw"}, "raw"),
    ],
)
def test_checkpoint_holds_the_weights_its_monitor_measured(tmp_path, monitor, kwargs, holds):
    trainer, model, ema, (checkpoint,) = checkpoints_of(tmp_path, [monitor], **kwargs)
    raw, averaged = model.state_dict(), ema.ema_state_dict()  # one epoch: as at the checkpoint
    assert not torch.equal(raw["net.1.weight"], averaged["net.1.weight"])
    assert checkpoint["state_dict_weights"] == holds
    in_state_dict, beside = (raw, averaged) if holds == "raw" else (averaged, raw)
    other = checkpoint["state_dict_ema"] if holds == "raw" else checkpoint["current_model_state"]
    for name in raw:
        assert torch.equal(checkpoint["state_dict"][name], in_state_dict[name]), name
        assert torch.equal(other[name], beside[name]), name

    # `test` on the checkpoint evaluates the weights in its state_dict.
    _, val = digits_loaders(n_train=600)
    trainer.test(model, dataloaders=val, ckpt_path="best", verbose=False)
    reference = copy.deepcopy(model)
    reference.load_state_dict(in_state_dict)
    expected, _ = evaluate(reference, val)
    assert trainer.callback_metrics["test/acc"].item() == pytest.approx(expected, abs=1e-6)


def test_resume_from_a_raw_weights_checkpoint_restores_both(tmp_path):
    trainer, model, ema, (checkpoint,) = checkpoints_of(tmp_path, ["val/acc"])
    assert checkpoint["state_dict_weights"] == "raw"
    torch.manual_seed(5)
    resumed_model, resumed_ema = PlainClassifier(), EMA(decay=0.9, copy_average_at_end=False)
    fit(
        tmp_path / "resumed",
        resumed_model,
        [resumed_ema],
        max_epochs=1,
        ckpt_path=trainer.checkpoint_callback.best_model_path,
        limit_val_batches=1,
    )
    assert resumed_ema.num_updates == ema.num_updates == 10
    for name, value in ema.ema_state_dict().items():
        assert torch.equal(resumed_ema.ema_state_dict()[name], value), name
    for name, value in model.state_dict().items():
        assert torch.equal(resumed_model.state_dict()[name], value), name


@pytest.mark.parametrize(
    ("monitors", "kwargs", "match"),
    [
        (["val/acc", "val/acc_ema"], {}, r"'val/acc': raw, 'val/acc_ema': ema.*checkpoint_weights"),
        (["val/acc_ema"], {"save_weights_only": True}, r"save_weights_only=True\) would store the raw"),
    ],
)
def test_checkpoints_that_cannot_hold_their_weights_are_refused_before_training(
    tmp_path, monitors, kwargs, match
):
    torch.manual_seed(0)
    model = PlainClassifier()
    before = copy.deepcopy(model.state_dict())
    ckpts = [ModelCheckpoint(dirpath=tmp_path / m.replace("/", "_"), monitor=m, **kwargs) for m in monitors]
    with pytest.raises(ValueError, match=match):
        fit(tmp_path, model, [EMA(decay=0.9), *ckpts], max_epochs=1, enable_checkpointing=True)
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name


class LiveRecorder(Callback):
    """The live state after every optimizer step, as the callbacks before it in the list leave it."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.states.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})


@pytest.mark.parametrize(("warmup", "pull"), [(None, 0.5), ("progress", 1.0)])
def test_lookahead_follows_the_rule_written_out(tmp_path, warmup, pull):
    torch.manual_seed(0)
    model = BatchNormClassifier()
    before, after = LiveRecorder(), LiveRecorder()
    decay, every, start, power = 0.8, 3, 1, 3.0
    ema = EMA(
        decay=decay,
        warmup=warmup,
        warmup_power=power,
        update_every_n_steps=every,
        start_step=start,
        lookahead=pull,
        copy_average_at_end=False,
    )
    fit(tmp_path, model, [before, ema, after], limit_val_batches=0)
    total = len(before.states)  # 2 epochs of 10 steps, one optimizer step per batch
    assert total == 20

    # The rule: at zero-based step i >= start with (i - start) % every == 0, the average moves towards the
    # live weights with decay d (the first update copies them), then live <- live + pull * (average - live).
    floats = [k for k, v in before.states[0].items() if v.is_floating_point()]
    average: dict[str, torch.Tensor] | None = None
    for i, (pre, post) in enumerate(zip(before.states, after.states, strict=True)):
        if i < start or (i - start) % every:
            assert all(torch.equal(pre[k], post[k]) for k in pre), f"step {i} must not be touched"
            continue
        if average is None:
            average = {k: pre[k].clone() for k in floats}
        else:
            d = decay * ((i + 1) / total) ** power if warmup == "progress" else decay
            average = {k: d * average[k] + (1 - d) * pre[k] for k in floats}
        for k in floats:
            expected = pre[k] + pull * (average[k] - pre[k])
            torch.testing.assert_close(post[k], expected, rtol=0, atol=1e-6, msg=f"step {i} {k}")
    ours = ema.ema_state_dict()
    for k in floats:
        torch.testing.assert_close(ours[k], average[k], rtol=0, atol=1e-6, msg=k)


def test_lookahead_resume_matches_uninterrupted_run(tmp_path):
    def make() -> EMA:
        return EMA(decay=0.9, warmup="progress", warmup_power=3.0, update_every_n_steps=4, lookahead=1.0)

    torch.manual_seed(0)
    initial = BatchNormClassifier()
    full_model, full_ema = copy.deepcopy(initial), make()
    fit(tmp_path / "full", full_model, [full_ema], max_epochs=3, limit_val_batches=0)

    class StopAt(Callback):  # an interrupted run: same plan (3 epochs), stopped mid-epoch 1
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            trainer.should_stop = trainer.should_stop or trainer.global_step == 13

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)  # at each epoch end
    first_model = copy.deepcopy(initial)
    fit(
        tmp_path / "first",
        first_model,
        [make(), checkpoints, StopAt()],
        max_epochs=3,
        enable_checkpointing=True,
        limit_val_batches=0,
    )
    torch.manual_seed(1)
    resumed_model, resumed_ema = BatchNormClassifier(), make()
    ckpt = tmp_path / "ckpt" / "epoch=0-step=10.ckpt"  # between two updates (steps 9 and 13)
    fit(tmp_path / "resumed", resumed_model, [resumed_ema], max_epochs=3, ckpt_path=ckpt, limit_val_batches=0)
    assert resumed_ema.num_updates == full_ema.num_updates
    for name, value in full_model.state_dict().items():
        torch.testing.assert_close(resumed_model.state_dict()[name], value, rtol=0, atol=1e-7, msg=name)
