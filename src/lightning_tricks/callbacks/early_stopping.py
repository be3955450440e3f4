"""Early stopping on a smoothed metric, with warm-up, best-weight restore and a loss-explosion rule.

:class:`SmoothedEarlyStopping` extends Lightning's :class:`~lightning.pytorch.callbacks.EarlyStopping`
and keeps all of its arguments and semantics: it smooths the monitored value, publishes it as
``f"{monitor}_smoothed"`` and lets Lightning's own rule (best score, ``min_delta``, ``patience``,
thresholds) decide on that metric through Lightning's public hooks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_tricks._lightning_compat import early_stopping_checks_on_train_epoch_end
from lightning_tricks.callbacks._explosion import ExplosionRule, check_divergence_factor
from lightning_tricks.callbacks._monitor import (
    FirstValidationNames,
    known_missing,
    missing_metric_message,
    resolve_mode,
    returned_loss,
    unvalidated_monitor_message,
)
from lightning_tricks.callbacks._smoothing import MetricSmoother

log = logging.getLogger(__name__)


class SmoothedEarlyStopping(EarlyStopping):
    r"""Lightning's ``EarlyStopping`` that decides on a smoothed metric.

    Every argument of :class:`~lightning.pytorch.callbacks.EarlyStopping` keeps its meaning; the
    comparison with ``best_score``, ``min_delta``, ``patience``, ``stopping_threshold`` and
    ``divergence_threshold`` uses the *smoothed* value, while ``check_finite`` looks at the raw value
    (a NaN stops at once). Lightning's rule itself runs on the published smoothed metric
    ``f"{monitor}_smoothed"``, so its messages name that metric. Additions:

    * **mode="auto"** (the default, as in Keras): accuracy-like names (``acc``, ``auc``, ``f1``, ...) are
      maximised, loss/error-like names (``loss``, ``error``, ``mse``, ...) minimised; any other name
      raises at construction, asking for ``mode="min"`` or ``"max"``.
    * **Wrong names early**: a validation ``monitor`` that is absent after the first validation (the
      sanity check counts) is reported then (``strict``: an error, else one warning on rank 0), not
      after the first training epoch.

    * **Smoothing** (Lightning #20617): ``smoothing="ema"`` (bias-corrected, see :class:`MetricSmoother`),
      ``"mean"`` or ``"median"`` over the last ``window`` checks, ``None`` for Lightning's behaviour. The
      smoothed value is written to ``trainer.callback_metrics`` and the loggers as
      ``f"{monitor}_smoothed"`` (so ``ModelCheckpoint(monitor="val/loss_smoothed")`` works too). Under
      DDP the raw value is first averaged across ranks (a no-op for metrics logged with
      ``sync_dist=True``), so every rank holds the same smoothing state, best score and best weights.
    * **restore_best_weights** (Lightning #1395): keep a CPU copy of the weights at the best smoothed
      check and load it into the model in ``on_train_end``, whether early stopping fired or training
      reached ``max_epochs`` (Keras does the same since tf-keras#693). It is not restored when training
      ends by an exception. The copy is part of the callback state, so a checkpoint holds the model
      twice.
    * **start_from_epoch** (Lightning #16881): before this epoch the smoother is fed and logged, but no
      best score is tracked, no patience is counted and the improvement/threshold rules never stop
      training. The safety rules (``check_finite`` and the explosion rule) stay active, because
      continuing a run whose loss is NaN or exploding never helps.
    * **Trainer(min_epochs)** (Lightning #19966): Lightning's callback sets ``trainer.should_stop``
      before ``min_epochs`` and the flag sticks, so training stops at ``min_epochs`` even if the metric
      improved in between. Here patience/threshold stops are held back until ``min_epochs`` epochs have
      run; counting continues, so a run still without improvement stops at the first allowed epoch and
      one that improved again keeps training.
    * **Explosion rule**: stop when the smoothed training loss exceeds ``divergence_factor`` times its
      initial value (the first value seen: the first epoch's mean at epoch-end checks, the first step's
      loss with ``train_check_every_n_steps``); the same rule as the diagnostics and the LR range test.
      The training loss is the loss ``training_step`` returns, or the logged metric ``train_monitor``
      when given. Without either (manual optimization) the rule switches itself off with one warning
      on rank 0 that names ``train_monitor``. The reason is ``EarlyStoppingReason.DIVERGENCE_THRESHOLD``
      and ``stopping_reason_message`` says which rule fired. The rule assumes a positive loss; it
      switches itself off with a warning otherwise.

    ``patience`` is configuration and is not taken from a checkpoint (Lightning's callback does so).
    Under DDP, when one rank decides to stop, every rank records that rank's ``stopping_reason`` and
    ``stopping_reason_message`` (rank 0 writes the checkpoints).

    Args:
        monitor: quantity to be monitored, e.g. ``"val/loss"``.
        min_delta: minimum change of the smoothed value that counts as an improvement.
        patience: number of checks without improvement after which training stops.
        verbose: log decisions.
        mode: ``"auto"`` (from the name of ``monitor``), ``"min"`` or ``"max"``.
        strict: raise when ``monitor`` (or ``train_monitor``) is not logged; with ``strict=False`` the check
            is skipped and one warning per name is shown on rank 0. Under DDP a metric missing on any rank
            counts as missing on every rank: all ranks raise, or with ``strict=False`` all skip.
        check_finite: stop when the raw monitored value is NaN or infinite.
        stopping_threshold: stop once the smoothed value reaches this threshold.
        divergence_threshold: stop once the smoothed value is worse than this threshold.
        check_on_train_epoch_end: run the check at the end of the training epoch instead of after
            validation (``None``: Lightning's default).
        log_rank_zero_only: log only on rank 0.
        smoothing: ``"ema"``, ``"mean"``, ``"median"`` or ``None``.
        alpha: EMA weight of the newest value, in ``(0, 1]``.
        window: number of checks for ``"mean"``/``"median"``, at least 1.
        restore_best_weights: load the weights of the best smoothed check when training ends.
        start_from_epoch: first epoch at which the improvement rules may act, at least 0.
        train_monitor: logged training loss for the explosion rule; ``None`` (default): the loss
            ``training_step`` returns.
        divergence_factor: explosion factor, greater than 1; ``None`` disables the rule.
        train_check_every_n_steps: read ``train_monitor`` every n optimizer steps instead of at the end
            of each training epoch.

    Attributes:
        best_epoch: epoch of the best smoothed check (-1 before any).
        initial_train_loss: first smoothed training loss, the explosion rule's baseline (``None`` before
            any).

    Raises:
        ValueError: for an unknown ``smoothing``, an argument outside its range, or ``mode="auto"`` with a
            ``monitor`` name that says neither "higher is better" nor "lower is better".
        RuntimeError: if ``strict`` and a monitored metric is not logged (on any rank); the message lists
            the available metrics.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> es = SmoothedEarlyStopping("val/loss", smoothing="ema", alpha=0.3, patience=5,
        ...                            restore_best_weights=True, start_from_epoch=3)
        >>> es.mode, es.smoothed_name
        ('min', 'val/loss_smoothed')
        >>> trainer = Trainer(callbacks=[es], max_epochs=100)  # doctest: +SKIP
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "auto",
        strict: bool = True,
        check_finite: bool = True,
        stopping_threshold: float | None = None,
        divergence_threshold: float | None = None,
        check_on_train_epoch_end: bool | None = None,
        log_rank_zero_only: bool = False,
        smoothing: str | None = "ema",
        alpha: float = 0.3,
        window: int = 5,
        restore_best_weights: bool = False,
        start_from_epoch: int = 0,
        train_monitor: str | None = None,
        divergence_factor: float | None = 3.0,
        train_check_every_n_steps: int | None = None,
    ) -> None:
        owner = type(self).__name__
        self._smoother = MetricSmoother(smoothing, alpha, window)
        self._train_smoother = MetricSmoother(smoothing, alpha, window)
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"`patience` must be an integer >= 0, got {patience!r}.")
        if min_delta < 0:
            raise ValueError(f"`min_delta` must be >= 0 (the direction comes from `mode`), got {min_delta}.")
        if not isinstance(start_from_epoch, int) or start_from_epoch < 0:
            raise ValueError(f"`start_from_epoch` must be an integer >= 0, got {start_from_epoch!r}.")
        check_divergence_factor(divergence_factor, owner)
        if train_check_every_n_steps is not None and (
            not isinstance(train_check_every_n_steps, int) or train_check_every_n_steps < 1
        ):
            raise ValueError(
                "`train_check_every_n_steps` must be an integer >= 1 or None,"
                f" got {train_check_every_n_steps!r}."
            )
        super().__init__(
            monitor=monitor,
            min_delta=min_delta,
            patience=patience,
            verbose=verbose,
            mode=resolve_mode(mode, monitor, owner),
            strict=strict,
            check_finite=check_finite,
            stopping_threshold=stopping_threshold,
            divergence_threshold=divergence_threshold,
            check_on_train_epoch_end=check_on_train_epoch_end,
            log_rank_zero_only=log_rank_zero_only,
        )
        self.smoothing = smoothing
        self.alpha = alpha
        self.window = window
        self.restore_best_weights = restore_best_weights
        self.start_from_epoch = start_from_epoch
        self.train_monitor = train_monitor
        self.divergence_factor = divergence_factor
        self.train_check_every_n_steps = train_check_every_n_steps

        self._explosion = None if divergence_factor is None else ExplosionRule(divergence_factor)
        self.smoothed_value: float | None = None
        self.best_epoch = -1
        self.best_weights: dict[str, Tensor] | None = None
        self._improved = False
        self._loss_sum: Tensor | float = 0.0  # losses returned by training_step in this epoch
        self._loss_count = 0
        self._first_names = FirstValidationNames()
        self._warned: set[str] = set()

    @property
    def smoothed_name(self) -> str:
        """Name under which the smoothed value is logged (and which Lightning's rule reads)."""
        return f"{self.monitor}_smoothed"

    @property
    def initial_train_loss(self) -> float | None:
        """First smoothed training loss: the explosion rule's baseline (``None`` before any)."""
        return None if self._explosion is None else self._explosion.initial

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            smoother=self._smoother.state_dict(),
            train_smoother=self._train_smoother.state_dict(),
            smoothed_value=self.smoothed_value,
            best_epoch=self.best_epoch,
            explosion=None if self._explosion is None else self._explosion.state_dict(),
            epoch_loss_sum=float(self._loss_sum),
            epoch_loss_count=self._loss_count,
            best_weights=self.best_weights,
        )
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        patience = self.patience
        super().load_state_dict(state_dict)
        self.patience = patience
        self._smoother.load_state_dict(state_dict.get("smoother", {}))
        self._train_smoother.load_state_dict(state_dict.get("train_smoother", {}))
        self.smoothed_value = state_dict.get("smoothed_value")
        self.best_epoch = state_dict.get("best_epoch", -1)
        if self._explosion is not None and state_dict.get("explosion") is not None:
            self._explosion.load_state_dict(state_dict["explosion"])
        self._loss_sum = state_dict.get("epoch_loss_sum", 0.0)
        self._loss_count = state_dict.get("epoch_loss_count", 0)
        self.best_weights = state_dict.get("best_weights")

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        unvalidated = unvalidated_monitor_message(
            type(self).__name__, "monitor", self.monitor, trainer, pl_module
        )
        if unvalidated is not None:
            # Lightning would report it only after the first training epoch, as a metric name to fix.
            if self.strict:
                raise ValueError(unvalidated)
            self._warned.add(self.monitor)  # said here; the per-check warning would repeat it
            rank_zero_warn(
                f"{unvalidated} With `strict=False` the run never stops early.", category=RuntimeWarning
            )
        self._check_names(trainer, self._first_names.at_train_start())

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._check_names(trainer, self._first_names.at_validation_end(trainer))
        if self._fitting(trainer) and not early_stopping_checks_on_train_epoch_end(self):
            self._check_monitor(trainer, super().on_validation_end)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._fitting(trainer):
            if early_stopping_checks_on_train_epoch_end(self):
                self._check_monitor(trainer, super().on_train_epoch_end)
            if self.train_check_every_n_steps is None:
                epoch_mean = self._loss_sum / self._loss_count if self._loss_count else None
                self._check_explosion(trainer, epoch_mean)
        # reset here, not at epoch start: a run resumed mid-epoch keeps the sum it checkpointed
        self._loss_sum, self._loss_count = 0.0, 0

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = returned_loss(outputs) if self.train_monitor is None else None
        if loss is not None:
            self._loss_sum = self._loss_sum + loss.float()
            self._loss_count += 1
        n = self.train_check_every_n_steps
        if n is None or not self._fitting(trainer) or trainer.global_step % n != 0:
            return
        self._check_explosion(trainer, loss)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.restore_best_weights:
            from lightning_tricks.callbacks.final_weights import check_final_weights  # imports us

            check_final_weights(trainer, self)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.restore_best_weights or self.best_weights is None:
            return
        pl_module.load_state_dict(self.best_weights)
        self._log(
            trainer,
            f"Restored the weights of epoch {self.best_epoch} (best {self.smoothed_name} ="
            f" {float(self.best_score):.4g}).",
            self.log_rank_zero_only,
        )

    # ------------------------------------------------------------------ checks
    @staticmethod
    def _fitting(trainer: pl.Trainer) -> bool:
        return (
            trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking and not trainer.fast_dev_run
        )

    def _report_missing(
        self, trainer: pl.Trainer, name: str, argument: str, logs: dict[str, Tensor], where: str
    ) -> None:
        msg = missing_metric_message(type(self).__name__, argument, name, logs, where)
        if self.strict:
            raise RuntimeError(msg)
        if name not in self._warned:
            self._warned.add(name)
            rank_zero_warn(
                f"{msg} With `strict=False` this check is skipped while it is missing.",
                category=RuntimeWarning,
            )

    def _check_names(self, trainer: pl.Trainer, names: dict[str, Any] | None) -> None:
        # A validation metric absent after the first validation (the sanity check counts) is a wrong name:
        # say so before training instead of after the first training epoch.
        if names is None or trainer.state.fn != TrainerFn.FITTING:
            return
        if trainer.strategy.reduce_boolean_decision(known_missing(self.monitor, names), all=False):
            self._report_missing(trainer, self.monitor, "monitor", names, " after the first validation")

    def _require(self, trainer: pl.Trainer, name: str, argument: str, logs: dict[str, Tensor]) -> bool:
        # Decided together before any other collective: a rank that returned here alone would leave the
        # others waiting in the collectives that follow.
        here = name in logs
        if trainer.strategy.reduce_boolean_decision(here, all=True):
            return True
        where = " on every rank (this rank has it, another one does not)" if here else ""
        self._report_missing(trainer, name, argument, logs, where)
        return False

    def _global_mean(self, trainer: pl.Trainer, value: Tensor) -> float:
        value = value.detach().squeeze().float()
        if trainer.world_size > 1:
            value = trainer.strategy.reduce(value.clone(), reduce_op="mean")
        return float(value)

    def _publish(self, trainer: pl.Trainer, name: str, value: float) -> None:
        tensor = torch.tensor(value)
        trainer.callback_metrics[name] = tensor
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics({name: value}, step=trainer.global_step)

    def _min_epochs_pending(self, trainer: pl.Trainer) -> bool:
        return trainer.current_epoch + 1 < (trainer.fit_loop.min_epochs or 0)

    def _check_monitor(self, trainer: pl.Trainer, lightning_check: Callable[..., None]) -> None:
        """Smooth the monitored value, publish it, and let Lightning's rule decide on it."""
        logs = trainer.callback_metrics
        if not self._require(trainer, self.monitor, "monitor", logs):
            return
        raw = self._global_mean(trainer, logs[self.monitor])
        if self.check_finite and not math.isfinite(raw):
            self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
            reason = (
                f"Monitored metric {self.monitor} = {raw} is not finite."
                f" Previous best value was {float(self.best_score):.3f}. Signaling Trainer to stop."
            )
            self._stop(trainer, True, reason)
            return
        self.smoothed_value = self._smoother.update(raw)
        self._publish(trainer, self.smoothed_name, self.smoothed_value)
        if trainer.current_epoch < self.start_from_epoch:
            return

        best_before, stop_before = self.best_score, trainer.should_stop
        before = (self.stopped_epoch, self.stopping_reason, self.stopping_reason_message)
        monitor = self.monitor
        self.monitor = self.smoothed_name  # Lightning's rule reads `monitor`: point it at the smoothed metric
        try:
            lightning_check(trainer, trainer.lightning_module)
        finally:
            self.monitor = monitor
        decided_here = self.stopping_reason != before[1]
        if trainer.should_stop and not stop_before:
            if self._min_epochs_pending(trainer):
                # Lightning's flag would stick and stop at min_epochs even after an improvement (#19966)
                trainer.should_stop = stop_before
                self.stopped_epoch, self.stopping_reason, self.stopping_reason_message = before
                if self.verbose:
                    min_epochs = trainer.fit_loop.min_epochs
                    self._log(trainer, f"Stop held back until `Trainer(min_epochs={min_epochs})` is reached.")
            elif trainer.world_size > 1:
                self._agree_on_reason(trainer, decided_here)
        self._improved = self.best_score is not best_before
        if self._improved:
            self.best_epoch = trainer.current_epoch
            if self.restore_best_weights:
                # The weights the monitor measured (an EMA's for an EMA metric), as a CPU copy: the
                # best weights must not cost accelerator memory.
                from lightning_tricks.callbacks.final_weights import weights_measured_by  # imports us

                weights = weights_measured_by(trainer, self.monitor)
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}

    def _training_loss(self, trainer: pl.Trainer, returned: Tensor | None) -> Tensor | None:
        """The explosion rule's input: the logged ``train_monitor``, else what ``training_step`` returned."""
        if self.train_monitor is not None:
            logs = trainer.callback_metrics
            return (
                logs[self.train_monitor]
                if self._require(trainer, self.train_monitor, "train_monitor", logs)
                else None
            )
        if trainer.strategy.reduce_boolean_decision(returned is not None, all=True):
            return returned
        rank_zero_warn(
            f"{type(self).__name__}: the explosion rule is off for this run: `training_step` returns no loss"
            " to watch (manual optimization?). Set `train_monitor` to the name of a logged training loss,"
            " or `divergence_factor=None` to silence this."
        )
        self._explosion = None
        return None

    def _check_explosion(self, trainer: pl.Trainer, returned: Tensor | None) -> None:
        if self._explosion is None:
            return
        value = self._training_loss(trainer, returned)
        if value is None:
            return
        name = self.train_monitor or "loss returned by training_step"
        raw = self._global_mean(trainer, value)
        if not math.isfinite(raw):
            if self.check_finite:
                self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
                self._stop(trainer, True, f"Training loss {name} = {raw} is not finite.")
            return
        smoothed = self._train_smoother.update(raw)
        exploded = self._explosion.update(smoothed)
        if not self._explosion.applicable:
            rank_zero_warn(
                f"The explosion rule needs a positive training loss, but the first {name} is {smoothed};"
                " it is disabled for this run (set `divergence_factor=None` to silence)."
            )
            self._explosion = None
        elif exploded:
            self.stopping_reason = EarlyStoppingReason.DIVERGENCE_THRESHOLD
            self._stop(
                trainer,
                True,
                f"Training loss exploded: smoothed {name} = {smoothed:.4g} >"
                f" divergence_factor {self.divergence_factor:g} x initial {self.initial_train_loss:.4g}"
                f" = {self._explosion.limit:.4g}. Signaling Trainer to stop.",
            )

    def _agree_on_reason(self, trainer: pl.Trainer, decided: bool) -> None:
        """Every rank takes the reason of the first rank that decided to stop (rank 0 writes checkpoints)."""
        strategy = trainer.strategy
        flags = strategy.all_gather(torch.tensor(int(decided), device=strategy.root_device))
        src = int(flags.flatten().nonzero()[0, 0])
        reason_value, message = strategy.broadcast(
            (self.stopping_reason.value, self.stopping_reason_message), src=src
        )
        self.stopping_reason = EarlyStoppingReason(reason_value)
        self.stopping_reason_message = message

    def _stop(self, trainer: pl.Trainer, should_stop: bool, reason: str | None) -> None:
        """Stop every process if any process decides to stop (for this callback's own rules)."""
        stop_any = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        if stop_any and not trainer.should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
        if stop_any and trainer.world_size > 1:
            self._agree_on_reason(trainer, should_stop)
        trainer.should_stop = trainer.should_stop or stop_any
        if reason and self.verbose:
            self._log(trainer, reason)

    def _log(self, trainer: pl.Trainer, message: str, rank_zero_only: bool | None = None) -> None:
        rank_zero_only = self.log_rank_zero_only if rank_zero_only is None else rank_zero_only
        rank = trainer.global_rank if trainer.world_size > 1 else None
        if rank is None or not rank_zero_only or rank == 0:
            log.info(rank_prefixed_message(message, rank))
