"""Learning-rate range test run before training, with robust suggestions and an exact state restore."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateFinder
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
from lightning.pytorch.tuner.lr_finder import _LRFinder
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.parsing import lightning_hasattr, lightning_setattr
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_tricks.callbacks._lr_suggestions import (
    MODES,
    SUGGESTIONS,
    SmoothedLossTracker,
    lr_schedule,
    suggest_all,
)
from lightning_tricks.callbacks._training_state import preserved_training_state
from lightning_tricks.records import run_dir

_MIN_STEPS = 10
# Consecutive non-finite losses after which the weights are assumed to be gone and the search stops.
_MAX_NON_FINITE = 3


@dataclass
class LRFinderResults:
    """Outcome of one range test. Lists hold the finite steps only, in order.

    Attributes:
        lrs: learning rate of the first param group at each kept step.
        losses: raw training loss (averaged over ranks) at each kept step.
        smoothed: bias-corrected EMA of ``losses``.
        suggestions: learning rate proposed by each rule (``steepest``, ``min_div_10``, ``valley``).
        suggestion: name of the rule whose value is ``lr``.
        lr: the chosen learning rate, ``None`` when no suggestion was possible.
        stopped_early: whether the search stopped on a diverging or non-finite loss.
        num_dropped: steps whose loss was NaN/inf and were left out of the curve.
    """

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestions: dict[str, float] = field(default_factory=dict)
    suggestion: str = "valley"
    lr: float | None = None
    stopped_early: bool = False
    num_dropped: int = 0


class LRFinder(LearningRateFinder):
    """LR range test (Smith 2017; fastai ``lr_find``) that runs before training and leaves no trace.

    Sweeps the learning rate of the first param group from ``min_lr`` to ``max_lr`` over ``num_steps``
    optimiser steps (other groups keep their ratio to it), records the loss, smooths it with a
    bias-corrected EMA, and proposes three learning rates: ``steepest`` (steepest descent of the smoothed
    loss w.r.t. log lr), ``min_div_10`` (lr at the minimum / 10) and ``valley`` (fastai's middle of the
    longest descending run). The rule named by ``suggestion`` is applied when ``apply=True``.

    It subclasses Lightning's :class:`~lightning.pytorch.callbacks.LearningRateFinder` so it is a drop-in
    replacement (same ``lr_find(trainer, pl_module)`` entry point, ``optimal_lr`` still holds Lightning's
    results object with ``plot()``/``suggestion()``, ``Tuner`` still sees an LR finder), but replaces
    ``_lr_find``: that one re-enters the fit loop with swapped callbacks and restores from a temporary
    checkpoint, which lets user callbacks and logged metrics leak into the real run, restores neither RNG
    of data-order generators nor param-group extras, hard-codes ``beta=0.98``, lets one NaN poison the
    average for good, and offers only the noisy ``steepest`` rule. Here the search is a small explicit
    loop (train dataloader -> ``strategy.batch_to_device`` -> ``strategy.training_step`` -> backward ->
    ``optimizer.step``), so no callback hook fires and ``self.log`` calls go to a throw-away collection.
    Afterwards parameters, buffers, grads, optimizer and scheduler state, grad scaler, data-order
    generators and all RNG streams are bit-identical to before (``try/finally`` + ``isolate_rng``).

    Applying ``lr`` scales every learning-rate value by ``lr / nominal``, where ``nominal`` is the first
    group's peak: OneCycleLR's ``max_lr``, CyclicLR's ``max_lr``, otherwise the group's initial lr. So
    param-group ratios and the schedule's shape are kept: ``lr``/``initial_lr``/``max_lr``/``min_lr`` in
    the groups and ``base_lrs``/``max_lrs``/``_last_lr`` in the schedulers (also nested ones).

    Under DDP every rank trains on its own shard through the DDP wrapper (gradients are synchronised),
    the per-step loss is averaged across ranks, and the results are broadcast from rank 0, so all ranks
    apply the same learning rate. Supported for automatic optimisation with plain autograd backward
    (single device, DDP); user overrides of ``optimizer_step``/``backward`` are not called during the search.

    Args:
        min_lr: first learning rate of the sweep, ``> 0``.
        max_lr: last learning rate of the sweep, ``> min_lr``.
        num_steps: optimiser steps in the sweep, ``>= 10``.
        mode: ``"exponential"`` (log-spaced, the usual choice) or ``"linear"``.
        beta: EMA factor for the loss in ``[0, 1)``; ``0`` disables smoothing.
        divergence_factor: stop once the smoothed loss exceeds this multiple of the best one (``> 1``),
            ``None`` to never stop early.
        suggestion: rule applied: ``"valley"``, ``"steepest"`` or ``"min_div_10"``.
        apply: set the suggested learning rate on the optimizer, schedulers and ``attr_name``.
        attr_name: attribute of ``pl_module`` or ``pl_module.hparams`` that also receives the learning rate.
        skip_begin: leading points ignored by the rules; ``None`` means 10% of the curve.
        skip_end: trailing points ignored by the rules, ``>= 0``.
        plot: save ``lr_finder.png`` (rank 0) and send it to the logger (W&B image, TensorBoard figure).
        dirpath: folder for the plot; default the run's own folder (:func:`lightning_tricks.run_dir`).

    Example::

        from lightning_tricks.callbacks.lr_finder import LRFinder

        finder = LRFinder(min_lr=1e-5, max_lr=1.0, num_steps=100, suggestion="valley")
        trainer = Trainer(callbacks=[finder], max_epochs=10)
        trainer.fit(model, datamodule=dm)
        print(finder.results.lr, finder.results.suggestions)
    """

    def __init__(
        self,
        min_lr: float = 1e-6,
        max_lr: float = 1.0,
        num_steps: int = 100,
        mode: str = "exponential",
        beta: float = 0.9,
        divergence_factor: float | None = 4.0,
        suggestion: str = "valley",
        apply: bool = True,
        attr_name: str | None = None,
        skip_begin: int | None = None,
        skip_end: int = 1,
        plot: bool = True,
        dirpath: str | None = None,
    ) -> None:
        if not (isinstance(min_lr, (int, float)) and min_lr > 0):
            raise ValueError(f"`min_lr` must be a number > 0, got {min_lr!r}.")
        if not (isinstance(max_lr, (int, float)) and max_lr > min_lr):
            raise ValueError(f"`max_lr` must be a number > `min_lr` ({min_lr}), got {max_lr!r}.")
        if not (isinstance(num_steps, int) and num_steps >= _MIN_STEPS):
            raise ValueError(f"`num_steps` must be an int >= {_MIN_STEPS}, got {num_steps!r}.")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if not (isinstance(beta, (int, float)) and 0 <= beta < 1):
            raise ValueError(f"`beta` must be in [0, 1), got {beta!r}.")
        if divergence_factor is not None and not divergence_factor > 1:
            raise ValueError(f"`divergence_factor` must be > 1 or None, got {divergence_factor!r}.")
        if suggestion not in SUGGESTIONS:
            raise ValueError(f"`suggestion` must be one of {SUGGESTIONS}, got {suggestion!r}.")
        if skip_begin is not None and not (isinstance(skip_begin, int) and skip_begin >= 0):
            raise ValueError(f"`skip_begin` must be an int >= 0 or None, got {skip_begin!r}.")
        if not (isinstance(skip_end, int) and skip_end >= 0):
            raise ValueError(f"`skip_end` must be an int >= 0, got {skip_end!r}.")
        super().__init__(
            min_lr=min_lr,
            max_lr=max_lr,
            num_training_steps=num_steps,
            mode=mode,
            early_stop_threshold=divergence_factor,
            update_attr=False,
            attr_name=attr_name or "",
        )
        self.min_lr = float(min_lr)
        self.max_lr = float(max_lr)
        self.num_steps = num_steps
        self.mode = mode
        self.beta = float(beta)
        self.divergence_factor = divergence_factor
        self.suggestion = suggestion
        self.apply = apply
        self.attr_name = attr_name
        self.skip_begin = skip_begin
        self.skip_end = skip_end
        self.plot = plot
        self.dirpath = dirpath
        self.results: LRFinderResults | None = None
        self.plot_path: str | None = None
        self._restored = False

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            min_lr=self.min_lr, max_lr=self.max_lr, num_steps=self.num_steps, mode=self.mode
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored and self.results is not None:
            if self.apply and self.attr_name and self.results.lr is not None:
                lightning_setattr(pl_module, self.attr_name, self.results.lr)
            rank_zero_info(
                f"LRFinder: restored from checkpoint, learning rate {self.results.lr} (search skipped)."
            )
            return
        self.lr_find(trainer, pl_module)

    @override
    def lr_find(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the range test, restore the exact pre-search state, then apply the chosen learning rate."""
        if trainer.fast_dev_run:
            rank_zero_warn("LRFinder: skipped because `fast_dev_run` is enabled.")
            return
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "LRFinder needs automatic optimization (`automatic_optimization=True`)."
            )
        if len(trainer.optimizers) != 1:
            raise MisconfigurationException(
                "LRFinder needs exactly one optimizer, `configure_optimizers` returned"
                f" {len(trainer.optimizers)}."
            )
        if self.attr_name and not lightning_hasattr(pl_module, self.attr_name):
            raise MisconfigurationException(
                f"`attr_name={self.attr_name!r}` is neither an attribute of the model nor of `model.hparams`."
            )
        trainer.fit_loop.setup_data()
        if trainer.train_dataloader is None:
            rank_zero_warn("LRFinder: skipped because there is no training data.")
            return

        optimizer = trainer.optimizers[0]
        schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
        nominal = _nominal_lrs(optimizer, schedulers)
        ratios = [n / nominal[0] if nominal[0] > 0 else 1.0 for n in nominal]

        epoch_loop = trainer.fit_loop.epoch_loop
        saved_results, saved_fx = epoch_loop._results, pl_module._current_fx_name
        with preserved_training_state(trainer, pl_module):
            try:
                # `self.log` in the search goes nowhere
                epoch_loop._results = _ResultCollection(training=True)
                pl_module._current_fx_name = "training_step"
                pl_module.train()
                results = self._search(trainer, optimizer, ratios)
            finally:
                epoch_loop._results, pl_module._current_fx_name = saved_results, saved_fx
                optimizer.zero_grad(set_to_none=True)

        results = LRFinderResults(**trainer.strategy.broadcast(asdict(results), src=0))
        self.results = results
        self.optimal_lr = _LRFinder(self.mode, self.min_lr, self.max_lr, self.num_steps)
        self.optimal_lr.results = {"lr": list(results.lrs), "loss": list(results.smoothed)}

        if results.lr is None:
            rank_zero_warn(
                "LRFinder: too few finite losses for a suggestion; the learning rate is left unchanged."
            )
        else:
            rank_zero_info(
                f"LRFinder: suggestions {results.suggestions}; using {self.suggestion}={results.lr:.3g}."
            )
            if self.apply:
                _scale_lrs(
                    optimizer, schedulers, results.lr / nominal[0] if nominal[0] > 0 else None, results.lr
                )
                if self.attr_name:
                    lightning_setattr(pl_module, self.attr_name, results.lr)
        if self.plot:
            self._plot_and_log(trainer, results)

    def _search(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, ratios: list[float]
    ) -> LRFinderResults:
        strategy = trainer.strategy
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        tracker = SmoothedLossTracker(self.beta, self.divergence_factor)
        out = LRFinderResults(suggestion=self.suggestion)
        loader = CombinedLoader(trainer.train_dataloader, "max_size_cycle")
        batches = iter(loader)
        non_finite = 0
        for lr in lr_schedule(self.min_lr, self.max_lr, self.num_steps, self.mode):
            try:
                batch, batch_idx, _ = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch, batch_idx, _ = next(batches)
            batch = strategy.batch_to_device(batch, dataloader_idx=0)
            for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
                group["lr"] = lr * ratio
            optimizer.zero_grad(set_to_none=True)
            step_out = strategy.training_step(batch, batch_idx)
            loss = step_out["loss"] if isinstance(step_out, dict) else step_out
            if loss is None:
                continue
            mean_loss = float(strategy.reduce(loss.detach().float(), reduce_op="mean"))
            (scaler.scale(loss) if scaler is not None else loss).backward()
            if not math.isfinite(mean_loss):
                out.num_dropped += 1
                non_finite += 1
                if non_finite >= _MAX_NON_FINITE:
                    out.stopped_early = True
                    break
                continue
            non_finite = 0
            self._step(trainer, optimizer, scaler, params)
            smoothed, diverged = tracker.update(mean_loss)
            out.lrs.append(lr)
            out.losses.append(mean_loss)
            out.smoothed.append(smoothed)
            if diverged:
                out.stopped_early = True
                break
        skip_begin = len(out.smoothed) // 10 if self.skip_begin is None else self.skip_begin
        out.suggestions = suggest_all(out.lrs, out.smoothed, skip_begin, self.skip_end)
        out.lr = out.suggestions.get(self.suggestion)
        return out

    @staticmethod
    def _step(
        trainer: pl.Trainer, optimizer: torch.optim.Optimizer, scaler: Any, params: list[torch.Tensor]
    ) -> None:
        if trainer.gradient_clip_val:
            if scaler is not None:
                scaler.unscale_(optimizer)
            if trainer.gradient_clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(params, trainer.gradient_clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(params, trainer.gradient_clip_val)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()

    def _plot_and_log(self, trainer: pl.Trainer, results: LRFinderResults) -> None:
        dirpath = self.dirpath or run_dir(trainer)  # run_dir: call on every rank
        if not trainer.is_global_zero or not results.lrs:
            return
        try:
            from matplotlib.figure import Figure
        except ImportError:
            rank_zero_warn("LRFinder: install matplotlib to get the loss-vs-lr plot.")
            return
        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        ax.plot(results.lrs, results.losses, color="0.7", linewidth=0.8, label="loss")
        ax.plot(results.lrs, results.smoothed, color="C0", label=f"smoothed (beta={self.beta})")
        for i, (name, lr) in enumerate(results.suggestions.items()):
            style = "-" if name == results.suggestion else ":"
            ax.axvline(lr, color=f"C{i + 1}", linestyle=style, label=f"{name} {lr:.2g}")
        if self.mode == "exponential":
            ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        ax.legend(fontsize="small")
        fig.tight_layout()
        os.makedirs(dirpath, exist_ok=True)
        self.plot_path = os.path.join(dirpath, "lr_finder.png")
        fig.savefig(self.plot_path, dpi=100)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_figure("lr_finder", fig, global_step=trainer.global_step)
            elif isinstance(logger, WandbLogger) or callable(getattr(logger, "log_image", None)):
                logger.log_image(key="lr_finder", images=[self.plot_path])

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"results": None if self.results is None else asdict(self.results)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("results")
        if saved is not None:
            self.results = LRFinderResults(**saved)
            self._restored = True


def _nominal_lrs(optimizer: torch.optim.Optimizer, schedulers: list[Any]) -> list[float]:
    """Peak learning rate of each param group as the schedule sees it (what the suggestion replaces)."""
    for scheduler in schedulers:
        if isinstance(scheduler, torch.optim.lr_scheduler.CyclicLR):
            return [float(v) for v in scheduler.max_lrs]
    return [float(g.get("max_lr", g.get("initial_lr", g["lr"]))) for g in optimizer.param_groups]


def _set(container: Any, key: Any, value: float) -> None:
    if isinstance(container[key], torch.Tensor):
        container[key].fill_(value)
    else:
        container[key] = value


def _scale_lrs(
    optimizer: torch.optim.Optimizer, schedulers: list[Any], factor: float | None, lr: float
) -> None:
    """Multiply every learning-rate value by ``factor`` (or set it to ``lr`` when the nominal lr is 0)."""

    def scaled(value: Any) -> float:
        return float(value) * factor if factor is not None else lr

    for group in optimizer.param_groups:
        keys = ["lr", "initial_lr"] + (["max_lr", "min_lr"] if "max_lr" in group else [])
        for key in keys:
            if key in group:
                _set(group, key, scaled(group[key]))
    pending = list(schedulers)
    while pending:
        scheduler = pending.pop()
        pending.extend(getattr(scheduler, "_schedulers", []))
        for name in ("base_lrs", "max_lrs", "_last_lr"):
            values = getattr(scheduler, name, None)
            if isinstance(values, list):
                for i, value in enumerate(values):
                    _set(values, i, scaled(value))
