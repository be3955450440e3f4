"""Early stopping on a smoothed metric, with warm-up, best-weight restore and a loss-explosion rule.

:class:`SmoothedEarlyStopping` extends Lightning's :class:`~lightning.pytorch.callbacks.EarlyStopping`
and keeps all of its arguments and semantics.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_tricks.callbacks._smoothing import SMOOTHINGS, MetricSmoother

log = logging.getLogger(__name__)


class SmoothedEarlyStopping(EarlyStopping):
    r"""Lightning's ``EarlyStopping`` that decides on a smoothed metric.

    Every argument of :class:`~lightning.pytorch.callbacks.EarlyStopping` keeps its meaning; the
    comparison with ``best_score``, ``min_delta``, ``patience``, ``stopping_threshold`` and
    ``divergence_threshold`` uses the *smoothed* value, while ``check_finite`` looks at the raw value
    (a NaN stops at once). Additions:

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
    * **Explosion rule**: stop when the smoothed training loss ``train_monitor`` exceeds
      ``divergence_factor`` times its initial value (the first value seen: the first epoch's mean at
      epoch-end checks, the first step's loss with ``train_check_every_n_steps``). The reason is
      ``EarlyStoppingReason.DIVERGENCE_THRESHOLD`` and ``stopping_reason_message`` says which rule fired.
      The rule assumes a positive loss; it switches itself off with a warning otherwise.

    ``patience`` is configuration and is not taken from a checkpoint (Lightning's callback does so).
    Under DDP, when one rank decides to stop, every rank records that rank's ``stopping_reason`` and
    ``stopping_reason_message`` (rank 0 writes the checkpoints).

    Args:
        monitor: quantity to be monitored, e.g. ``"val/loss"``.
        min_delta: minimum change of the smoothed value that counts as an improvement.
        patience: number of checks without improvement after which training stops.
        verbose: log decisions.
        mode: ``"min"`` or ``"max"``.
        strict: raise when ``monitor`` (or ``train_monitor``) is not logged. Under DDP a metric missing on
            any rank counts as missing on every rank: all ranks raise, or with ``strict=False`` all skip.
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
        train_monitor: logged training loss for the explosion rule.
        divergence_factor: explosion factor, greater than 0; ``None`` disables the rule.
        train_check_every_n_steps: read ``train_monitor`` every n optimizer steps instead of at the end
            of each training epoch.

    Attributes:
        best_epoch: epoch of the best smoothed check (-1 before any).
        initial_train_loss: first smoothed value of ``train_monitor`` (``None`` before any).

    Raises:
        ValueError: for an unknown ``smoothing`` or an argument outside its range.
        RuntimeError: if ``strict`` and a monitored metric is not logged (on any rank); the message lists
            the available metrics.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> es = SmoothedEarlyStopping("val/loss", smoothing="ema", alpha=0.3, patience=5,
        ...                            restore_best_weights=True, start_from_epoch=3)
        >>> trainer = Trainer(callbacks=[es], max_epochs=100)  # doctest: +SKIP
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        min_delta: float = 0.0,
        patience: int = 3,
        verbose: bool = False,
        mode: str = "min",
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
        train_monitor: str = "train/loss",
        divergence_factor: float | None = 3.0,
        train_check_every_n_steps: int | None = None,
    ) -> None:
        if smoothing is not None and smoothing not in SMOOTHINGS:
            raise ValueError(f"`smoothing` must be one of {SMOOTHINGS} or None, got {smoothing!r}.")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"`alpha` must be in (0, 1], got {alpha}.")
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"`window` must be an integer >= 1, got {window!r}.")
        if not isinstance(patience, int) or patience < 0:
            raise ValueError(f"`patience` must be an integer >= 0, got {patience!r}.")
        if min_delta < 0:
            raise ValueError(f"`min_delta` must be >= 0 (the direction comes from `mode`), got {min_delta}.")
        if not isinstance(start_from_epoch, int) or start_from_epoch < 0:
            raise ValueError(f"`start_from_epoch` must be an integer >= 0, got {start_from_epoch!r}.")
        if divergence_factor is not None and not divergence_factor > 0:
            raise ValueError(f"`divergence_factor` must be > 0 or None to disable, got {divergence_factor}.")
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
            mode=mode,
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

        self._smoother = MetricSmoother(smoothing, alpha, window)
        self._train_smoother = MetricSmoother(smoothing, alpha, window)
        self.smoothed_value: float | None = None
        self.best_epoch = -1
        self.best_weights: dict[str, Tensor] | None = None
        self.initial_train_loss: float | None = None
        self._improved = False

    @property
    def smoothed_name(self) -> str:
        """Name under which the smoothed value is logged."""
        return f"{self.monitor}_smoothed"

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            smoother=self._smoother.state_dict(),
            train_smoother=self._train_smoother.state_dict(),
            smoothed_value=self.smoothed_value,
            best_epoch=self.best_epoch,
            initial_train_loss=self.initial_train_loss,
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
        self.initial_train_loss = state_dict.get("initial_train_loss")
        self.best_weights = state_dict.get("best_weights")

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self.train_check_every_n_steps is None and not self._should_skip_check(trainer):
            self._run_explosion_check(trainer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        n = self.train_check_every_n_steps
        if n is None or self._should_skip_check(trainer) or trainer.global_step % n != 0:
            return
        self._run_explosion_check(trainer)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.restore_best_weights:
            from lightning_tricks.callbacks.final_weights import check_final_weights  # imports us

            check_final_weights(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.restore_best_weights or self.best_weights is None:
            return
        pl_module.load_state_dict(self.best_weights)
        self._log_info(
            trainer,
            f"Restored the weights of epoch {self.best_epoch} (best {self.smoothed_name} ="
            f" {float(self.best_score):.4g}).",
            self.log_rank_zero_only,
        )

    # ------------------------------------------------------------------ checks
    def _require(self, trainer: pl.Trainer, name: str, logs: dict[str, Tensor]) -> bool:
        # Decided together before any other collective: a rank that returned here alone would leave the
        # others waiting in the collectives that follow.
        here = name in logs
        if trainer.strategy.reduce_boolean_decision(here, all=True):
            return True
        where = " on every rank (this rank has it, another one does not)" if here else ""
        msg = (
            f"Early stopping conditioned on metric `{name}` which is not available{where}. Pass in or modify"
            f" your `{type(self).__name__}` callback to use any of the following: `{'`, `'.join(logs)}`"
        )
        if self.strict:
            raise RuntimeError(msg)
        if self.verbose:
            rank_zero_warn(msg, category=RuntimeWarning)
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

    @override
    def _run_early_stopping_check(self, trainer: pl.Trainer) -> None:
        logs = trainer.callback_metrics
        if trainer.fast_dev_run or not self._require(trainer, self.monitor, logs):
            return
        raw = self._global_mean(trainer, logs[self.monitor])
        if self.check_finite and not math.isfinite(raw):
            self._stop(trainer, True, self._evaluate_stopping_criteria(torch.tensor(raw))[1])
            return
        self.smoothed_value = self._smoother.update(raw)
        self._publish(trainer, self.smoothed_name, self.smoothed_value)
        if trainer.current_epoch < self.start_from_epoch:
            return

        self._improved = False
        should_stop, reason = self._evaluate_stopping_criteria(torch.tensor(self.smoothed_value))
        if should_stop and self._min_epochs_pending(trainer):
            min_epochs = trainer.fit_loop.min_epochs
            reason = f"{reason} Held back until `Trainer(min_epochs={min_epochs})` is reached."
            should_stop = False
            self.stopping_reason = EarlyStoppingReason.NOT_STOPPED
        if self._improved:
            self.best_epoch = trainer.current_epoch
            if self.restore_best_weights:
                # The weights the monitor measured (an EMA's for an EMA metric), as a CPU copy: the
                # best weights must not cost accelerator memory.
                from lightning_tricks.callbacks.final_weights import weights_measured_by  # imports us

                weights = weights_measured_by(trainer, self.monitor)
                self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
        self._stop(trainer, should_stop, reason)

    @override
    def _improvement_message(self, current: Tensor) -> str:
        self._improved = True
        return super()._improvement_message(current)

    def _run_explosion_check(self, trainer: pl.Trainer) -> None:
        if self.divergence_factor is None or trainer.fast_dev_run:
            return
        logs = trainer.callback_metrics
        if not self._require(trainer, self.train_monitor, logs):
            return
        raw = self._global_mean(trainer, logs[self.train_monitor])
        if not math.isfinite(raw):
            if self.check_finite:
                self.stopping_reason = EarlyStoppingReason.NON_FINITE_METRIC
                self._stop(trainer, True, f"Training loss {self.train_monitor} = {raw} is not finite.")
            return
        smoothed = self._train_smoother.update(raw)
        if self.initial_train_loss is None:
            if smoothed <= 0:
                rank_zero_warn(
                    f"The explosion rule needs a positive training loss, but the first `{self.train_monitor}`"
                    f" is {smoothed}; it is disabled for this run (set `divergence_factor=None` to silence)."
                )
                self.divergence_factor = None
                return
            self.initial_train_loss = smoothed
            return
        limit = self.divergence_factor * self.initial_train_loss
        if smoothed > limit:
            self.stopping_reason = EarlyStoppingReason.DIVERGENCE_THRESHOLD
            self._stop(
                trainer,
                True,
                f"Training loss exploded: smoothed {self.train_monitor} = {smoothed:.4g} >"
                f" divergence_factor {self.divergence_factor:g} x initial {self.initial_train_loss:.4g}"
                f" = {limit:.4g}. Signaling Trainer to stop.",
            )

    def _stop(self, trainer: pl.Trainer, should_stop: bool, reason: str | None) -> None:
        # stop every process if any process decides to stop
        stop_any = trainer.strategy.reduce_boolean_decision(should_stop, all=False)
        if stop_any and trainer.world_size > 1:
            # every rank records the reason of the first rank that decided to stop (rank 0 writes checkpoints)
            strategy = trainer.strategy
            decided = strategy.all_gather(torch.tensor(int(should_stop), device=strategy.root_device))
            src = int(decided.flatten().nonzero()[0, 0])
            reason_value, reason = strategy.broadcast((self.stopping_reason.value, reason), src=src)
            self.stopping_reason = EarlyStoppingReason(reason_value)
        if stop_any and not trainer.should_stop:
            self.stopped_epoch = trainer.current_epoch
            self.stopping_reason_message = reason
        trainer.should_stop = trainer.should_stop or stop_any
        if reason and self.verbose:
            self._log_info(trainer, reason, self.log_rank_zero_only)
