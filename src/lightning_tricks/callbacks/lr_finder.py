"""Learning-rate range test run before training, with robust suggestions and an exact state restore."""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import LearningRateFinder
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import CombinedLoader
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torchmetrics import Metric
from typing_extensions import override

from lightning_tricks._io import atomic_savefig
from lightning_tricks._lightning_compat import lightning_lr_finder_result
from lightning_tricks.callbacks._explosion import check_divergence_factor
from lightning_tricks.callbacks._lr_scaling import scale_learning_rates
from lightning_tricks.callbacks._lr_suggestions import (
    MODES,
    SUGGESTIONS,
    SmoothedLossTracker,
    lr_schedule,
    refusal_reason,
    suggest_all,
    suggest_indices,
)
from lightning_tricks.callbacks._requirements import require
from lightning_tricks.callbacks._training_state import preserved_training_state
from lightning_tricks.recipes.optim_wrappers import find_wrapper
from lightning_tricks.recipes.sam import SAM
from lightning_tricks.records import run_dir

_MIN_STEPS = 10
# A finite curve shorter than this cannot be judged: the loss diverged at once.
_MIN_POINTS = 10
# Names a plain module's learning rate goes by (as Lightning's Tuner looks them up), then the recipe's.
_LR_NAMES = ("lr", "learning_rate", "optimizer.lr")
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
        lr: the chosen learning rate, ``None`` when no suggestion was possible or it was refused.
        refused: why the suggestion was not applied (too few points, flat curve, edge of the range).
        stopped_early: whether the search stopped on a diverging or non-finite loss.
        num_dropped: steps whose loss was NaN/inf and were left out of the curve.
        hparam: the hyperparameter that records the applied rate (e.g. ``lr`` or ``optimizer.lr``).
        hparam_value: the value written to it.
    """

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    suggestions: dict[str, float] = field(default_factory=dict)
    suggestion: str = "valley"
    lr: float | None = None
    refused: str | None = None
    stopped_early: bool = False
    num_dropped: int = 0
    hparam: str | None = None
    hparam_value: float | None = None


class LRFinder(LearningRateFinder):
    """LR range test (Smith 2017; fastai ``lr_find``) that runs before training and leaves no trace.

    Sweeps the learning rate of the first param group from ``min_lr`` to ``max_lr`` over ``num_steps``
    optimiser steps (other groups keep their ratio to it), records the loss, smooths it with a
    bias-corrected EMA, and proposes three learning rates: ``steepest`` (steepest descent of the smoothed
    loss w.r.t. log lr), ``min_div_10`` (lr at the minimum / 10) and ``valley`` (fastai's middle of the
    longest descending run). The rule named by ``suggestion`` is applied when ``apply=True``.

    It subclasses Lightning's :class:`~lightning.pytorch.callbacks.LearningRateFinder` so it is a drop-in
    replacement (same ``lr_find(trainer, pl_module)`` entry point, ``optimal_lr`` still holds Lightning's
    results object with ``plot()``/``suggestion()``, ``Tuner`` still sees an LR finder), but runs its own
    search instead of Lightning's, which re-enters the fit loop with swapped callbacks and restores from a
    temporary checkpoint, which lets user callbacks and logged metrics leak into the real run, restores
    neither RNG of data-order generators nor param-group extras, hard-codes ``beta=0.98``, lets one NaN
    poison the average for good, and offers only the noisy ``steepest`` rule. Here the search is a small
    explicit loop (train dataloader -> ``strategy.batch_to_device`` -> ``strategy.training_step`` ->
    backward -> ``optimizer.step``), so no callback hook fires and ``self.log`` calls are discarded.
    The loss is what ``training_step`` returns (a tensor or a dict with ``"loss"``): any module works.
    Afterwards parameters, buffers, grads, optimizer and scheduler state, grad scaler, data-order
    generators and all RNG streams are bit-identical to before (``try/finally`` + ``isolate_rng``).

    Applying ``lr`` scales every learning-rate value by ``lr / nominal``, where ``nominal`` is the first
    group's peak: OneCycleLR's ``max_lr``, CyclicLR's ``max_lr``, otherwise the group's initial lr. So
    param-group ratios and the schedule's shape are kept: ``lr``/``initial_lr``/``max_lr``/``min_lr`` in
    the groups and ``base_lrs``/``max_lrs``/last rates in the schedulers (also nested ones).

    The suggestion is refused (a warning says why, the learning rate stays as configured) when the
    curve has fewer than 10 finite points (the loss diverged at once: ``min_lr`` too high), when the
    smoothed loss never falls ``min_loss_drop`` below its first value (flat: the range is too low), or
    when the suggestion is the first or last point the rules looked at (the best rate lies outside).

    The applied rate is recorded where the run's configuration keeps it, as Lightning's ``Tuner`` does:
    ``attr_name``, else the first of ``hparams.lr``, ``hparams.learning_rate`` and the recipe's
    ``hparams.optimizer.lr`` that exists (in proportion when the configured rate is scaled on its way to
    the optimizer, e.g. by the linear scaling rule). It is logged as the metric ``lr_finder/lr`` and the
    updated hyperparameter is logged again at the start of training, so the logged config is what ran.

    Under DDP every rank trains on its own shard through the DDP wrapper (gradients are synchronised),
    the per-step loss is averaged across ranks, and the results are broadcast from rank 0, so all ranks
    apply the same learning rate. Supported for automatic optimisation with plain autograd backward
    (single device, DDP); user overrides of ``optimizer_step``/``backward`` are not called during the search.

    Args:
        min_lr: first learning rate of the sweep, ``> 0``.
        max_lr: last learning rate of the sweep, ``> min_lr``.
        num_steps: optimiser steps in the sweep, ``>= 10``.
        mode: ``"exponential"`` (log-spaced, the usual choice) or ``"linear"``.
        alpha: EMA weight of the newest loss, in ``(0, 1]`` (``1 - beta`` in fastai's and Lightning's
            finders; every smoother of this library names the factor ``alpha``); ``1`` disables smoothing.
        divergence_factor: stop once the smoothed loss exceeds this multiple of its first value (``> 1``),
            ``None`` to never stop early.
        suggestion: rule applied: ``"valley"``, ``"steepest"`` or ``"min_div_10"``.
        min_loss_drop: smallest relative fall of the smoothed loss, in ``[0, 1)``, for the curve to count
            as informative; ``0`` accepts flat curves.
        apply: set the suggested learning rate on the optimizer, schedulers and hyperparameters.
        attr_name: attribute of ``pl_module`` or (dotted) key of ``pl_module.hparams`` that records the
            learning rate; ``None`` looks for ``lr``, ``learning_rate``, ``optimizer.lr``.
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
        alpha: float = 0.1,
        divergence_factor: float | None = 4.0,
        suggestion: str = "valley",
        apply: bool = True,
        attr_name: str | None = None,
        skip_begin: int | None = None,
        skip_end: int = 1,
        plot: bool = True,
        dirpath: str | None = None,
        min_loss_drop: float = 0.05,
    ) -> None:
        if not (isinstance(min_lr, (int, float)) and min_lr > 0):
            raise ValueError(f"`min_lr` must be a number > 0, got {min_lr!r}.")
        if not (isinstance(max_lr, (int, float)) and max_lr > min_lr):
            raise ValueError(f"`max_lr` must be a number > `min_lr` ({min_lr}), got {max_lr!r}.")
        if not (isinstance(num_steps, int) and num_steps >= _MIN_STEPS):
            raise ValueError(f"`num_steps` must be an int >= {_MIN_STEPS}, got {num_steps!r}.")
        if mode not in MODES:
            raise ValueError(f"`mode` must be one of {MODES}, got {mode!r}.")
        if not (isinstance(alpha, (int, float)) and 0 < alpha <= 1):
            raise ValueError(
                f"`alpha` (EMA weight of the newest loss) must be in (0, 1], got {alpha!r};"
                " e.g. 0.1, or 1 for raw losses."
            )
        check_divergence_factor(divergence_factor, type(self).__name__)
        if suggestion not in SUGGESTIONS:
            raise ValueError(f"`suggestion` must be one of {SUGGESTIONS}, got {suggestion!r}.")
        if skip_begin is not None and not (isinstance(skip_begin, int) and skip_begin >= 0):
            raise ValueError(f"`skip_begin` must be an int >= 0 or None, got {skip_begin!r}.")
        if not (isinstance(skip_end, int) and skip_end >= 0):
            raise ValueError(f"`skip_end` must be an int >= 0, got {skip_end!r}.")
        if not (isinstance(min_loss_drop, (int, float)) and 0 <= min_loss_drop < 1):
            raise ValueError(f"`min_loss_drop` must be in [0, 1), got {min_loss_drop!r}; e.g. 0.05.")
        if attr_name is not None and not (isinstance(attr_name, str) and attr_name):
            raise ValueError(f"`attr_name` must be a non-empty string or None, got {attr_name!r}.")
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
        self.alpha = float(alpha)
        self.divergence_factor = divergence_factor
        self.suggestion = suggestion
        self.apply = apply
        self.attr_name = attr_name
        self.skip_begin = skip_begin
        self.skip_end = skip_end
        self.plot = plot
        self.dirpath = dirpath
        self.min_loss_drop = float(min_loss_drop)
        self.results: LRFinderResults | None = None
        self.plot_path: str | None = None
        self._restored = False
        self._to_log: LRFinderResults | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            min_lr=self.min_lr, max_lr=self.max_lr, num_steps=self.num_steps, mode=self.mode
        )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._restored and self.results is not None:
            if self.apply and self.results.hparam is not None and self.results.hparam_value is not None:
                _write_hparam(pl_module, self.results.hparam, self.results.hparam_value)
                self._to_log = self.results
            rank_zero_info(
                f"LRFinder: restored from checkpoint, learning rate {self.results.lr} (search skipped)."
            )
            return
        self.lr_find(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning logged the initial hyperparameters: log what the search changed on top of them.
        results, self._to_log = self._to_log, None
        if results is None or results.lr is None:
            return
        for logger in trainer.loggers:
            logger.log_metrics({"lr_finder/lr": results.lr}, step=trainer.global_step)
            if results.hparam is not None:
                top = results.hparam.split(".")[0]
                if top in pl_module.hparams:
                    logger.log_hyperparams({top: pl_module.hparams[top]})

    @override
    def lr_find(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the range test, restore the exact pre-search state, then apply the chosen learning rate."""
        if trainer.fast_dev_run:
            rank_zero_warn("LRFinder: skipped because `fast_dev_run` is enabled.")
            return
        require(
            "LRFinder",
            trainer,
            pl_module,
            why="the range test steps the optimizer through the training loop at rising learning rates",
            automatic_optimization=True,
            single_optimizer=True,
        )
        hparam = _find_lr_name(pl_module, self.attr_name) if self.apply else None
        if self.apply and self.attr_name and hparam is None:
            raise ValueError(
                f"LRFinder(attr_name={self.attr_name!r}): neither an attribute of the model nor a key of"
                " `model.hparams` (dots reach into nested ones, e.g. 'optimizer.lr'). Set attr_name to where"
                " the model keeps its learning rate, or leave it None."
            )
        trainer.fit_loop.setup_data()
        if trainer.train_dataloader is None:
            rank_zero_warn("LRFinder: skipped because there is no training data.")
            return

        optimizer = trainer.optimizers[0]
        schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs]
        nominal = _nominal_lrs(optimizer, schedulers)
        ratios = [n / nominal[0] if nominal[0] > 0 else 1.0 for n in nominal]

        # Their accumulated values may come from a checkpoint (a resumed run) without any update here.
        fresh_metrics = {
            m: copy.deepcopy(m.metric_state)
            for m in pl_module.modules()
            if isinstance(m, Metric) and m.update_count == 0
        }
        with preserved_training_state(trainer, pl_module):
            try:
                with _logging_discarded(pl_module):
                    pl_module.train()
                    results = self._search(trainer, optimizer, ratios)
            finally:
                optimizer.zero_grad(set_to_none=True)
                # torchmetrics updated in training_step count no search batch
                for metric, state in fresh_metrics.items():
                    if metric.update_count:
                        metric.reset()
                        for name, value in state.items():
                            setattr(metric, name, value)

        results = LRFinderResults(**trainer.strategy.broadcast(asdict(results), src=0))
        self.results = results
        self.optimal_lr = lightning_lr_finder_result(
            self.mode, self.min_lr, self.max_lr, self.num_steps, results.lrs, results.smoothed
        )

        if results.lr is None:
            reason = results.refused or "no finite loss was recorded"
            rank_zero_warn(
                f"LRFinder: not applying a learning rate ({self.suggestion}"
                f"={results.suggestions.get(self.suggestion, float('nan')):.3g}): {reason}. The learning rate"
                f" stays as configured ({nominal[0]:.3g}); lr_finder.png shows the curve."
            )
        else:
            rank_zero_info(
                f"LRFinder: suggestions {results.suggestions}; using {self.suggestion}={results.lr:.3g}."
            )
            if self.apply:
                if nominal[0] > 0:
                    factor = results.lr / nominal[0]
                    scale_learning_rates(optimizer, schedulers, [factor] * len(nominal))
                else:  # nothing to scale from: set the rate itself, keeping the groups' nominal ratios
                    for group in optimizer.param_groups:
                        group["lr"] = results.lr
                if hparam is not None:
                    results.hparam = hparam
                    results.hparam_value = _recorded_value(pl_module, hparam, results.lr, nominal[0])
                    _write_hparam(pl_module, hparam, results.hparam_value)
                else:
                    rank_zero_info(
                        "LRFinder: the model keeps no `lr`, `learning_rate` or `optimizer.lr` hyperparameter;"
                        " set `attr_name` to record the applied learning rate in its hparams."
                    )
                self._to_log = results
        if self.plot:
            self._plot_and_log(trainer, results)

    def _search(
        self, trainer: pl.Trainer, optimizer: torch.optim.Optimizer, ratios: list[float]
    ) -> LRFinderResults:
        strategy = trainer.strategy
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        tracker = SmoothedLossTracker(self.alpha, self.divergence_factor)
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
            loss = _loss_of(strategy.training_step(batch, batch_idx))
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
            closure = None
            if find_wrapper(optimizer, SAM) is not None:  # SAM evaluates the loss again at w + e
                closure = partial(_loss_and_backward, strategy, optimizer, batch, batch_idx)
            self._step(trainer, optimizer, scaler, params, closure)
            smoothed, diverged = tracker.update(mean_loss)
            out.lrs.append(lr)
            out.losses.append(mean_loss)
            out.smoothed.append(smoothed)
            if diverged:
                out.stopped_early = True
                break
        skip_begin = len(out.smoothed) // 10 if self.skip_begin is None else self.skip_begin
        out.suggestions = suggest_all(out.lrs, out.smoothed, skip_begin, self.skip_end)
        if out.suggestions:
            index = suggest_indices(out.lrs, out.smoothed, skip_begin, self.skip_end)[self.suggestion]
            out.refused = refusal_reason(
                out.lrs, out.smoothed, index, skip_begin, self.skip_end, _MIN_POINTS, self.min_loss_drop
            )
            out.lr = None if out.refused else out.suggestions[self.suggestion]
        return out

    @staticmethod
    def _step(
        trainer: pl.Trainer,
        optimizer: torch.optim.Optimizer,
        scaler: Any,
        params: list[torch.Tensor],
        closure: Callable[[], Any] | None = None,
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
        elif closure is not None:
            optimizer.step(closure)
        else:
            optimizer.step()

    def _plot_and_log(self, trainer: pl.Trainer, results: LRFinderResults) -> None:
        dirpath = self.dirpath or run_dir(trainer)  # run_dir: call on every rank
        if not trainer.is_global_zero or not results.lrs:
            return
        from matplotlib.figure import Figure  # a core dependency, imported here to keep imports fast

        fig = Figure(figsize=(6, 4))
        ax = fig.subplots()
        ax.plot(results.lrs, results.losses, color="0.7", linewidth=0.8, label="loss")
        ax.plot(results.lrs, results.smoothed, color="C0", label=f"smoothed (alpha={self.alpha})")
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
        atomic_savefig(fig, self.plot_path, dpi=100)
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


def _loss_and_backward(strategy: Any, optimizer: torch.optim.Optimizer, batch: Any, batch_idx: int) -> Any:
    """The closure an optimizer that re-evaluates the loss (SAM) is stepped with during the search."""
    optimizer.zero_grad(set_to_none=True)
    loss = _loss_of(strategy.training_step(batch, batch_idx))
    if loss is not None:
        loss.backward()
    return loss


def _nominal_lrs(optimizer: torch.optim.Optimizer, schedulers: list[Any]) -> list[float]:
    """Peak learning rate of each param group as the schedule sees it (what the suggestion replaces)."""
    for scheduler in schedulers:
        if isinstance(scheduler, torch.optim.lr_scheduler.CyclicLR):
            return [float(v) for v in scheduler.max_lrs]
    return [float(g.get("max_lr", g.get("initial_lr", g["lr"]))) for g in optimizer.param_groups]


def _loss_of(step_output: Any) -> torch.Tensor | None:
    """The loss in what ``training_step`` returned: the tensor itself or the dict's ``"loss"``."""
    if step_output is None or isinstance(step_output, torch.Tensor):
        return step_output
    if isinstance(step_output, dict) and isinstance(step_output.get("loss"), torch.Tensor):
        return step_output["loss"]
    found = sorted(step_output) if isinstance(step_output, dict) else type(step_output).__name__
    raise ValueError(
        "LRFinder reads the loss from what `training_step` returns: a tensor or a dict with a 'loss' tensor"
        f" (Lightning's own contract), got {found}. Return the loss from `training_step`."
    )


@contextmanager
def _logging_discarded(pl_module: pl.LightningModule) -> Iterator[None]:
    """``self.log``/``self.log_dict`` do nothing inside: the search is not part of the run's record."""

    def discard(*args: Any, **kwargs: Any) -> None:
        return None

    names = ("log", "log_dict")
    shadowed = {name: pl_module.__dict__[name] for name in names if name in pl_module.__dict__}
    for name in names:
        pl_module.__dict__[name] = discard
    try:
        yield
    finally:
        for name in names:
            if name in shadowed:
                pl_module.__dict__[name] = shadowed[name]
            else:
                del pl_module.__dict__[name]


def _hparam_parent(pl_module: pl.LightningModule, name: str) -> tuple[Any, str] | None:
    """The mapping in ``pl_module.hparams`` that holds the (dotted) ``name`` and its last key."""
    *path, key = name.split(".")
    node: Any = pl_module.hparams
    for part in path:
        node = node.get(part) if hasattr(node, "get") else None
        if node is None:
            return None
    if hasattr(node, "__contains__") and hasattr(node, "__setitem__") and key in node:
        return node, key
    return None


def _find_lr_name(pl_module: pl.LightningModule, attr_name: str | None) -> str | None:
    """The first of ``attr_name`` (or the usual names) that the module or its hparams has."""
    for name in [attr_name] if attr_name else _LR_NAMES:
        if _hparam_parent(pl_module, name) is not None or ("." not in name and hasattr(pl_module, name)):
            return name
    return None


def _recorded_value(pl_module: pl.LightningModule, name: str, lr: float, nominal: float) -> float:
    """What the hyperparameter must say to produce ``lr``: scaled in proportion if it maps to ``nominal``."""
    parent = _hparam_parent(pl_module, name)
    old = parent[0][parent[1]] if parent is not None else getattr(pl_module, name, None)
    if isinstance(old, (int, float)) and old > 0 and nominal > 0 and not math.isclose(old, nominal):
        return float(old) * lr / nominal
    return float(lr)


def _write_hparam(pl_module: pl.LightningModule, name: str, value: float) -> None:
    parent = _hparam_parent(pl_module, name)
    if parent is not None:
        parent[0][parent[1]] = value
    if "." not in name and hasattr(pl_module, name):
        setattr(pl_module, name, value)
