"""LRFinder: suggestion rules on known curves, exact restore, applied learning rate, resume and DDP."""

from __future__ import annotations

import copy
import io
import json
import math
import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from helpers import PlainClassifier, ddp_trainer_kwargs, digits_loaders, quiet_trainer_kwargs
from lightning.pytorch.callbacks import Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.callbacks._lr_suggestions import (
    SmoothedLossTracker,
    suggest_all,
    suggest_min_div_10,
    suggest_steepest,
    suggest_valley,
)
from lightning_tricks.callbacks.lr_finder import LRFinder

# ---------------------------------------------------------------- pure rules


def _tanh_curve(n: int = 101) -> tuple[list[float], list[float]]:
    """Loss falling fastest at lr=1e-3 (tanh step in log10 lr), then rising quadratically after 1e-1."""
    x = torch.linspace(-5, 0, n, dtype=torch.float64)
    loss = 2 - torch.tanh(2 * (x + 3)) + 5 * torch.clamp(x + 1, min=0) ** 2
    return (10**x).tolist(), loss.tolist()


def test_steepest_and_min_div_10_on_known_curve():
    lrs, losses = _tanh_curve()
    # d/dx of -tanh(2(x+3)) is most negative at x = -3 exactly: grid index 40
    assert suggest_steepest(lrs, losses) == 40
    assert lrs[40] == pytest.approx(1e-3)
    argmin = min(range(len(losses)), key=losses.__getitem__)
    assert suggest_min_div_10(lrs, losses) == argmin
    assert suggest_all(lrs, losses)["min_div_10"] == pytest.approx(lrs[argmin] / 10)


def test_valley_is_middle_of_longest_descent():
    lrs, losses = _tanh_curve()
    argmin = min(range(len(losses)), key=losses.__getitem__)
    # strictly decreasing from index 0 to argmin: the valley sits half-way down it
    assert abs(suggest_valley(lrs, losses) - argmin / 2) <= 1
    # a short early dip followed by a bump must not win over the long descent after it
    bumpy = [3.0, 2.0, 1.5, 9.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.5, 3.2, 3.1, 12.0]
    # fastai's rule by hand: the longest descent is 9.0 ... 3.1 (indices 3..11, 9 points); fastai
    # counts its start as end - length = 2, splits the 9 steps in thirds (3) and picks
    # start + 3 + int(3 / 2) = 6.
    assert suggest_valley(list(range(1, 14)), bumpy) == 6
    assert suggest_valley(list(range(1, 14)), bumpy) == _valley_by_patience_sorting(bumpy)


def _valley_by_patience_sorting(losses: list[float]) -> int:
    """fastai's valley from an independent O(n log n) longest-strictly-decreasing-run computation."""
    import bisect

    tails: list[float] = []  # tails[k]: largest negated end value of a decreasing run of length k + 1
    length_at = []
    for v in losses:
        k = bisect.bisect_left(tails, -v)
        tails[k : k + 1] = [-v]
        length_at.append(k + 1)
    best_len = max(length_at)
    end = length_at.index(best_len)  # fastai keeps the first index reaching the longest run
    start = end - best_len
    section = (end - start) / 3
    return start + int(section) + int(section / 2)


def test_skip_begin_ignores_initial_drop():
    lrs, losses = _tanh_curve()
    losses = [losses[0] + 10.0, *losses[1:]]  # huge drop between the first two points
    assert suggest_steepest(lrs, losses) in (0, 1)
    assert suggest_steepest(lrs, losses, skip_begin=5, skip_end=1) == 40


def test_bias_corrected_ema_and_non_finite_drop():
    beta = 0.8
    raw = [2.0, 1.5, float("nan"), 1.2, float("inf"), 1.0]
    tracker = SmoothedLossTracker(alpha=1 - beta, divergence_factor=None)
    got = [tracker.update(v)[0] for v in raw]
    avg, t, expected = 0.0, 0, []
    for v in raw:
        if math.isfinite(v):
            t += 1
            avg = beta * avg + (1 - beta) * v
            expected.append(avg / (1 - beta**t))
        else:
            expected.append(None)
    assert got[2] is None and got[4] is None
    assert [g for g in got if g is not None] == pytest.approx(
        [e for e in expected if e is not None], rel=1e-12
    )
    assert got[0] == pytest.approx(2.0)  # bias correction: the first smoothed value is the loss itself


def test_divergence_flag():
    tracker = SmoothedLossTracker(alpha=1.0, divergence_factor=4.0)
    flags = [tracker.update(v)[1] for v in [3.0, 1.0, 11.9, 12.0, 12.1]]
    assert flags == [False, False, False, False, True]  # 4x the first loss, not the best one


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_lr": 0.0}, "min_lr"),
        ({"min_lr": 1e-2, "max_lr": 1e-2}, "max_lr"),
        ({"num_steps": 5}, "num_steps"),
        ({"mode": "cosine"}, "mode"),
        ({"suggestion": "fastest"}, "suggestion"),
        ({"alpha": 0.0}, "alpha"),
        ({"divergence_factor": 0.5}, "divergence_factor"),
        ({"skip_end": -1}, "skip_end"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LRFinder(**kwargs)


# ---------------------------------------------------------------- on a real model


class RecordingLogger(Logger):
    """Logger that only remembers what it was asked to log."""

    def __init__(self, save_dir: str) -> None:
        super().__init__()
        self._save_dir = save_dir
        self.images: list[tuple[str, list]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    @property
    def save_dir(self) -> str:
        return self._save_dir

    def log_metrics(self, metrics, step=None) -> None:
        pass

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_image(self, key: str, images: list, step=None, **kwargs) -> None:
        self.images.append((key, images))


def test_applied_suggestion_trains_digits_and_is_plotted(tmp_path):
    L.seed_everything(0)
    train, val = digits_loaders(batch_size=32, shuffle=True)
    model = PlainClassifier(lr=1e-5)  # a learning rate that would barely move in this budget
    finder = LRFinder(min_lr=1e-4, max_lr=10.0, num_steps=40, attr_name="lr")
    logger = RecordingLogger(str(tmp_path / "logs"))
    kwargs = {**quiet_trainer_kwargs(tmp_path), "logger": logger}
    trainer = L.Trainer(max_epochs=3, callbacks=[finder], **kwargs)
    trainer.fit(model, train, val)

    res = finder.results
    lr = res.lr
    # the applied rate is the valley of the recorded curve, recomputed here independently:
    # bias-corrected EMA (alpha 0.1) of the raw losses, then fastai's valley on 10%..n-1 of it
    avg, smoothed = 0.0, []
    for t, loss in enumerate(res.losses, start=1):
        avg = 0.9 * avg + 0.1 * loss
        smoothed.append(avg / (1 - 0.9**t))
    assert res.smoothed == pytest.approx(smoothed, rel=1e-9)
    begin = len(smoothed) // 10
    idx = begin + _valley_by_patience_sorting(smoothed[begin : len(smoothed) - 1])
    assert lr == res.lrs[idx] == res.suggestions["valley"]
    assert res.lrs == pytest.approx(np.logspace(-4, 1, 40)[: len(res.lrs)].tolist(), rel=1e-9)
    assert set(finder.results.suggestions) == {"steepest", "min_div_10", "valley"}
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(lr)
    assert model.hparams.lr == pytest.approx(lr)
    # best fixed lr in {0.01, 0.045, 0.1, 0.3} reaches 0.79-0.90 here; lr=1e-5 stays near chance
    assert trainer.callback_metrics["val/acc"] >= 0.85

    plot = Path(finder.plot_path)
    assert plot.parent == tmp_path / "logs"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert logger.images == [("lr_finder", [str(plot)])]


class NaNAtSomeSteps(PlainClassifier):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if batch_idx in (3, 4) else loss


def test_non_finite_losses_dropped_and_divergence_stops(tmp_path):
    train, _ = digits_loaders(batch_size=64)
    finder = LRFinder(min_lr=1e-3, max_lr=0.1, num_steps=12, apply=False, plot=False)
    trainer = L.Trainer(
        max_steps=1, limit_val_batches=0, callbacks=[finder], **quiet_trainer_kwargs(tmp_path)
    )
    trainer.fit(NaNAtSomeSteps(), train)
    res = finder.results
    assert res.num_dropped == 2 and len(res.lrs) == 10 and not res.stopped_early
    assert all(math.isfinite(v) for v in res.smoothed)

    finder = LRFinder(min_lr=1e-2, max_lr=1e4, num_steps=40, apply=False, plot=False, alpha=1.0)
    trainer = L.Trainer(
        max_steps=1, limit_val_batches=0, callbacks=[finder], **quiet_trainer_kwargs(tmp_path)
    )
    trainer.fit(PlainClassifier(), train)
    res = finder.results
    assert res.stopped_early and len(res.lrs) < 40
    assert res.smoothed[-1] > 4.0 * res.smoothed[0]
    assert all(s <= 4.0 * res.smoothed[0] for s in res.smoothed[:-1])


# ---------------------------------------------------------------- exact restore


class AdamOneCycleNet(PlainClassifier):
    """Dropout, BatchNorm buffers, two param groups, Adam and a OneCycle schedule."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(),
            torch.nn.Linear(64, 32),
            torch.nn.BatchNorm1d(32),
            torch.nn.ReLU(),
            torch.nn.Dropout(0.3),
            torch.nn.Linear(32, 10),
        )

    def configure_optimizers(self):
        groups = [
            {"params": self.net[1].parameters(), "lr": 0.1},
            {"params": [*self.net[2].parameters(), *self.net[5].parameters()], "lr": 0.05},
        ]
        opt = torch.optim.Adam(groups)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[0.1, 0.05], total_steps=100)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _capture(trainer, pl_module) -> dict:
    loader = trainer.train_dataloader
    return {
        "model": copy.deepcopy(pl_module.state_dict()),
        "grads": [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()],
        "modes": [m.training for m in pl_module.modules()],
        "optimizer": copy.deepcopy(trainer.optimizers[0].state_dict()),
        "scheduler": copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict()),
        "counters": (trainer.global_step, trainer.current_epoch, trainer.fit_loop.total_batch_idx),
        "rng": (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()),
        "data_rng": None if loader is None else loader.generator.get_state(),
        "metrics": dict(trainer.callback_metrics),
    }


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


class StateProbe(Callback):
    """Gives the optimizer real state before the search, then records the state around it."""

    def __init__(self, warm_up: bool, watch: Callback) -> None:
        self.warm_up = warm_up
        self.watch = watch
        self.seen: dict | None = None

    def on_fit_start(self, trainer, pl_module):
        if self.warm_up:
            opt, sched = trainer.optimizers[0], trainer.lr_scheduler_configs[0].scheduler
            x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
            for _ in range(3):
                opt.zero_grad()
                torch.nn.functional.cross_entropy(pl_module(x), y).backward()
                opt.step()
                sched.step()
            pl_module.eval()  # the search must not leave the model in train mode either
        trainer.fit_loop.setup_data()
        self.seen = {**_capture(trainer, pl_module), "watched": copy.deepcopy(self.watch.state_dict())}


class HookCounter(Callback):
    def __init__(self) -> None:
        self.calls = 0

    def on_train_batch_start(self, *args, **kwargs):
        self.calls += 1

    def on_before_backward(self, *args, **kwargs):
        self.calls += 1

    def on_before_optimizer_step(self, *args, **kwargs):
        self.calls += 1


def test_search_leaves_every_state_bit_identical(tmp_path):
    x, y = torch.rand(256, 1, 8, 8), torch.randint(0, 10, (256,))
    train = DataLoader(
        TensorDataset(x, y), batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    counter = HookCounter()
    stopper = EarlyStopping(monitor="train/loss", patience=0, check_on_train_epoch_end=True)
    before, after = StateProbe(warm_up=True, watch=stopper), StateProbe(warm_up=False, watch=stopper)
    finder = LRFinder(num_steps=20, max_lr=10.0, apply=False, plot=False)
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        callbacks=[before, counter, stopper, finder, after],
        **quiet_trainer_kwargs(tmp_path),
    )
    trainer.fit(AdamOneCycleNet(), train)

    assert len(finder.results.lrs) > 5
    _assert_same(before.seen, after.seen)
    assert before.seen["optimizer"]["state"]  # the Adam moments were real, not empty
    assert not after.seen["metrics"]  # nothing logged in the search leaked into callback metrics
    assert after.seen["modes"] == before.seen["modes"] and not any(after.seen["modes"])
    # no user hook ran during the search: the counter saw only the one real training step
    assert counter.calls == 3
    assert math.isinf(after.seen["watched"]["best_score"])  # EarlyStopping saw no loss from the search


class OneCycleProbe(Callback):
    def on_fit_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.groups = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
        self.base_lrs = list(trainer.lr_scheduler_configs[0].scheduler.base_lrs)

    def on_train_end(self, trainer, pl_module):
        self.final_lrs = [g["lr"] for g in trainer.optimizers[0].param_groups]


def test_apply_updates_one_cycle_consistently(tmp_path):
    train, _ = digits_loaders(batch_size=64)
    finder = LRFinder(min_lr=1e-4, max_lr=10.0, num_steps=30, plot=False)
    probe = OneCycleProbe()
    trainer = L.Trainer(
        max_steps=7, limit_val_batches=0, callbacks=[finder, probe], **quiet_trainer_kwargs(tmp_path)
    )
    trainer.fit(AdamOneCycleNet(), train)

    lr = finder.results.lr
    ref_params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    ref_opt = torch.optim.Adam([{"params": [p]} for p in ref_params], lr=1.0)
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=[lr, lr / 2], total_steps=100)
    for group, ref_group in zip(probe.groups, ref_opt.param_groups, strict=True):
        for key in ("max_lr", "initial_lr", "min_lr", "lr"):
            assert group[key] == pytest.approx(ref_group[key], rel=1e-12)
    assert probe.base_lrs == pytest.approx(ref.base_lrs, rel=1e-12)
    for _ in range(7):
        ref_opt.step()
        ref.step()
    assert probe.final_lrs == pytest.approx([g["lr"] for g in ref_opt.param_groups], rel=1e-9)


# ---------------------------------------------------------------- resume


def _fit_digits(
    tmp_path, max_epochs: int, finder: LRFinder, ckpt_path=None
) -> tuple[L.Trainer, PlainClassifier]:
    L.seed_everything(0)
    train, _ = digits_loaders(batch_size=128, n_train=512)
    model = PlainClassifier(lr=1e-3)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    kwargs = {**quiet_trainer_kwargs(tmp_path), "enable_checkpointing": True}
    trainer = L.Trainer(max_epochs=max_epochs, limit_val_batches=0, callbacks=[finder, ckpt], **kwargs)
    trainer.fit(model, train, ckpt_path=ckpt_path)
    return trainer, model


def test_resume_skips_search_and_matches_uninterrupted_run(tmp_path, monkeypatch):
    args = {"min_lr": 1e-4, "max_lr": 10.0, "num_steps": 20, "attr_name": "lr", "plot": False}
    full_finder = LRFinder(**args)
    _, full = _fit_digits(tmp_path / "full", 3, full_finder)

    first = LRFinder(**args)
    _fit_digits(tmp_path / "part", 1, first)
    ckpt = tmp_path / "part" / "ckpt" / "last.ckpt"
    saved = torch.load(ckpt, weights_only=True)["callbacks"][first.state_key]
    assert saved["results"]["lr"] == first.results.lr

    resumed_finder = LRFinder(**args)
    monkeypatch.setattr(LRFinder, "_search", lambda *a, **k: pytest.fail("search re-ran on resume"))
    trainer, resumed = _fit_digits(tmp_path / "part", 3, resumed_finder, ckpt_path=str(ckpt))

    assert resumed_finder.results == full_finder.results
    assert resumed.hparams.lr == full_finder.results.lr
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(full_finder.results.lr)
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- DDP


class RankReport(Callback):
    """Writes what each rank ended up with, so the parent process can compare them."""

    def __init__(self, finder: LRFinder, out_dir: str) -> None:
        self.finder = finder
        self.out_dir = out_dir

    def on_train_start(self, trainer, pl_module):
        report = {
            "lr": self.finder.results.lr,
            "optimizer_lr": trainer.optimizers[0].param_groups[0]["lr"],
            "smoothed": self.finder.results.smoothed,
            "weights": float(sum(p.double().sum() for p in pl_module.parameters())),
        }
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


def lr_finder_on_two_ranks(directory):
    train, _ = digits_loaders(batch_size=32, n_train=512)
    finder = LRFinder(min_lr=1e-4, max_lr=10.0, num_steps=20, plot=True, dirpath=str(directory / "plots"))
    kwargs = ddp_trainer_kwargs(directory)
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        callbacks=[finder, RankReport(finder, str(directory))],
        **kwargs,
    )
    trainer.fit(PlainClassifier(lr=1e-3), train)


@pytest.mark.ddp(scenario=lr_finder_on_two_ranks)
def test_ddp_ranks_agree_on_curve_and_suggestion(ddp_scenario):
    directory = ddp_scenario.directory
    r0, r1 = (json.loads((directory / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["lr"] is not None and r0["lr"] == r1["lr"]
    assert r0["optimizer_lr"] == pytest.approx(r0["lr"]) and r1["optimizer_lr"] == pytest.approx(r0["lr"])
    assert r0["smoothed"] == r1["smoothed"] and len(r0["smoothed"]) > 5
    assert r0["weights"] == pytest.approx(r1["weights"], rel=1e-6)  # restored weights still in sync
    assert (directory / "plots" / "lr_finder.png").exists()


# ---------------------------------------------------------------- real loggers


def _search_only_fit(tmp_path, logger) -> tuple[L.Trainer, LRFinder]:
    L.seed_everything(0)
    train, _ = digits_loaders(batch_size=64, n_train=256)
    finder = LRFinder(min_lr=1e-4, max_lr=10.0, num_steps=20)
    kwargs = {**quiet_trainer_kwargs(tmp_path), "logger": logger}
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, callbacks=[finder], **kwargs)
    trainer.fit(PlainClassifier(), train)
    return trainer, finder


def test_plot_is_logged_as_a_tensorboard_figure(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(save_dir=str(tmp_path))
    _, finder = _search_only_fit(tmp_path, logger)
    assert Path(finder.plot_path) == Path(logger.log_dir) / "lr_finder.png"

    events = EventAccumulator(logger.log_dir, size_guidance={"images": 0})
    events.Reload()
    assert events.Tags()["images"] == ["lr_finder"]
    (image,) = events.Images("lr_finder")
    assert image.step == 0  # logged before the first training step
    assert (image.width, image.height) == (600, 400)
    logged = np.asarray(Image.open(io.BytesIO(image.encoded_image_string)).convert("RGB"), dtype=np.float32)
    saved = np.asarray(Image.open(finder.plot_path).convert("RGB"), dtype=np.float32)
    assert logged.shape == saved.shape == (400, 600, 3)
    assert logged.std() > 10  # a drawn plot, not a blank canvas
    assert np.abs(logged - saved).mean() < 1  # the same figure as the saved file


def test_plot_is_logged_as_a_wandb_image_offline(tmp_path):
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="lr-finder")
    try:
        _, finder = _search_only_fit(tmp_path, logger)
        run_dir = Path(logger.experiment.dir)
        summary = logger.experiment.summary._as_dict()["lr_finder"]
    finally:
        logger.experiment.finish()
    assert run_dir.parent.name.startswith("offline-run-") and run_dir.is_relative_to(tmp_path)
    assert summary["_type"] == "images/separated" and summary["count"] == 1
    (media,) = (run_dir / "media" / "images").glob("lr_finder_*.png")
    assert summary["filenames"] == [str(media.relative_to(run_dir))]
    assert media.read_bytes() == Path(finder.plot_path).read_bytes()


# ---------------------------------------------------------------- the record, refusals, any module


def _logged_csv(log_dir: Path) -> tuple[list[dict], dict]:
    import csv

    from lightning.pytorch.core.saving import load_hparams_from_yaml

    rows = list(csv.DictReader((log_dir / "metrics.csv").open()))
    return rows, load_hparams_from_yaml(str(log_dir / "hparams.yaml"))


class LrAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module):
        self.lr = trainer.optimizers[0].param_groups[0]["lr"]


def test_applied_lr_is_written_to_hparams_and_logged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    train, _ = digits_loaders(batch_size=64, n_train=512)
    finder, seen = LRFinder(min_lr=1e-4, max_lr=10.0, num_steps=20, plot=False), LrAtTrainStart()
    logger = CSVLogger(str(tmp_path), name="plain")
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        callbacks=[finder, seen],
        **{**quiet_trainer_kwargs(tmp_path), "logger": logger},
    )
    model = PlainClassifier(lr=1e-3)  # no attr_name: found as hparams.lr, as Lightning's Tuner does
    trainer.fit(model, train)
    rows, hparams = _logged_csv(Path(logger.log_dir))
    logged = [float(r["lr_finder/lr"]) for r in rows if r.get("lr_finder/lr")]
    lr = finder.results.lr
    assert lr is not None and lr != 1e-3 and finder.results.hparam == "lr"
    assert seen.lr == lr == model.hparams.lr == hparams["lr"] == pytest.approx(logged[0], rel=1e-12)
    assert len(logged) == 1


def test_applied_lr_is_written_to_the_recipe_optimizer_config(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from lightning_tricks.recipes import ImageClassifier
    from lightning_tricks.recipes.optim import OptimizerConfig

    train, _ = digits_loaders(batch_size=64, n_train=512)
    finder, seen = LRFinder(min_lr=1e-4, max_lr=10.0, num_steps=20, plot=False), LrAtTrainStart()
    logger = CSVLogger(str(tmp_path), name="recipe")
    trainer = L.Trainer(
        max_steps=1,
        limit_val_batches=0,
        callbacks=[finder, seen],
        **{**quiet_trainer_kwargs(tmp_path), "logger": logger},
    )
    model = ImageClassifier(
        "mlp",
        num_classes=10,
        in_channels=1,
        model_kwargs={"input_size": 8},
        optimizer=OptimizerConfig(name="sgd", lr=1e-3),
    )
    trainer.fit(model, train)
    rows, hparams = _logged_csv(Path(logger.log_dir))
    logged = [float(r["lr_finder/lr"]) for r in rows if r.get("lr_finder/lr")]
    lr = finder.results.lr
    assert lr is not None and finder.results.hparam == "optimizer.lr"
    assert seen.lr == lr == model.hparams.optimizer["lr"] == hparams["optimizer"]["lr"]
    assert logged == [pytest.approx(lr, rel=1e-12)]


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        # the loss explodes at once: two finite points, nothing to judge (min_lr far too high)
        ({"min_lr": 1e4, "max_lr": 1e8, "num_steps": 20}, "only 2 finite loss points"),
        # nothing trains at 1e-12..1e-11: the smoothed loss moves well under 5%
        ({"min_lr": 1e-12, "max_lr": 1e-11, "num_steps": 20}, "the curve is flat"),
        # still falling at max_lr: the minimum (and min_div_10) sits on the last point
        ({"min_lr": 1e-2, "max_lr": 0.3, "num_steps": 20, "suggestion": "min_div_10"}, "last point"),
    ],
)
def test_uninformative_curves_are_refused_and_leave_the_lr(tmp_path, kwargs, reason):
    train, _ = digits_loaders(batch_size=64, n_train=512, shuffle=False)
    finder, seen = LRFinder(plot=False, **kwargs), LrAtTrainStart()
    trainer = L.Trainer(
        max_steps=1, limit_val_batches=0, callbacks=[finder, seen], **quiet_trainer_kwargs(tmp_path)
    )
    model = PlainClassifier(lr=0.05)
    with pytest.warns(UserWarning, match="LRFinder: not applying") as record:
        trainer.fit(model, train)
    assert reason in finder.results.refused
    (message,) = [str(w.message) for w in record if "LRFinder" in str(w.message)]
    assert reason in message
    assert finder.results.lr is None and finder.results.suggestions  # suggested, but not applied
    assert seen.lr == 0.05 and model.hparams.lr == 0.05


def test_refusal_rules_on_hand_built_curves():
    from lightning_tricks.callbacks._lr_suggestions import refusal_reason

    lrs = np.logspace(-4, 0, 20).tolist()
    falling_then_rising = [3.0 - 2 * math.sin(math.pi * i / 19) for i in range(20)]
    assert refusal_reason(lrs, falling_then_rising, 9, 2, 1, 10, 0.05) is None
    assert "first point" in refusal_reason(lrs, falling_then_rising, 2, 2, 1, 10, 0.05)
    assert "last point" in refusal_reason(lrs, falling_then_rising, 18, 2, 1, 10, 0.05)
    flat = [2.3 - 0.001 * i for i in range(20)]  # falls 0.8%: below the 5% bar, above a 0.5% one
    assert "flat" in refusal_reason(lrs, flat, 9, 2, 1, 10, 0.05)
    assert refusal_reason(lrs, flat, 9, 2, 1, 10, 0.005) is None
    assert "only 9 finite" in refusal_reason(lrs[:9], falling_then_rising[:9], 4, 0, 0, 10, 0.05)


class DictBatchModule(L.LightningModule):
    """A module written without this library in mind: dict batches, dict output, own metric names."""

    def __init__(self, learning_rate: float = 1e-3, key: str = "loss"):
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))

    def training_step(self, batch, batch_idx):
        loss = torch.nn.functional.cross_entropy(self.net(batch["image"]), batch["label"])
        self.log("my_train_loss", loss)
        return {self.hparams.key: loss, "extra": loss.detach()}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.learning_rate)


def _dict_loader() -> DataLoader:
    from helpers import digits_tensors

    x, y = digits_tensors(512)
    return DataLoader([{"image": a, "label": b} for a, b in zip(x, y, strict=True)], batch_size=64)


def test_loss_is_read_from_what_training_step_returns_for_any_module(tmp_path):
    finder = LRFinder(min_lr=1e-4, max_lr=10.0, num_steps=20, plot=False)
    trainer = L.Trainer(max_steps=1, callbacks=[finder], **quiet_trainer_kwargs(tmp_path))
    model = DictBatchModule()
    trainer.fit(model, _dict_loader())
    res = finder.results
    assert len(res.losses) >= 10 and res.losses[0] == pytest.approx(math.log(10), abs=0.3)
    assert res.lr is not None and model.hparams.learning_rate == res.lr  # found as `learning_rate`
    assert "my_train_loss" in trainer.callback_metrics  # the real step still logs; the search did not

    trainer = L.Trainer(max_steps=1, callbacks=[LRFinder(plot=False)], **quiet_trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"a dict with a 'loss' tensor .* got \['extra', 'objective'\]"):
        trainer.fit(DictBatchModule(key="objective"), _dict_loader())


def test_unknown_attr_name_is_refused_before_the_search(tmp_path):
    train, _ = digits_loaders(batch_size=64, n_train=256)
    finder = LRFinder(attr_name="optimizer.lr", plot=False)
    trainer = L.Trainer(max_steps=1, callbacks=[finder], **quiet_trainer_kwargs(tmp_path))
    with pytest.raises(ValueError, match=r"attr_name='optimizer.lr'.*neither an attribute"):
        trainer.fit(PlainClassifier(), train)
    assert finder.results is None
