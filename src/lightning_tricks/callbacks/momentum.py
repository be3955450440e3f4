"""Momentum ramp: raise SGD ``momentum`` / Adam ``betas[0]`` linearly from a start to an end value."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch.optim.lr_scheduler import CyclicLR, OneCycleLR
from typing_extensions import override


class MomentumSchedule(pl.Callback):
    r"""Ramp the momentum linearly from ``start`` to ``end`` over ``ramp_epochs`` epochs, then hold it.

    ``momentum(t) = start + (end - start) * min(t / ramp_epochs, 1)``, where ``t`` is the epoch index
    (``interval="epoch"``, set at each epoch start) or the fractional epoch
    ``epoch + batch_idx / num_training_batches`` (``interval="step"``, set before each batch). Each param
    group is handled on its own: ``momentum`` for SGD/RMSprop-style groups, ``betas[0]`` for the Adam
    family.

    The value is a pure function of training progress and is stored in the optimizer's param groups,
    which the checkpoint already holds, so the callback keeps no state of its own.

    A ``OneCycleLR`` or ``CyclicLR`` with ``cycle_momentum=True`` already drives the momentum; the
    callback then warns and leaves that optimizer alone instead of fighting it.

    Args:
        start: momentum at ``t = 0``, in ``[0, 1)``.
        end: momentum from ``t = ramp_epochs`` on, in ``[0, 1)``.
        ramp_epochs: length of the ramp in epochs, > 0.
        interval: ``"epoch"`` or ``"step"``.

    Raises:
        ValueError: for arguments out of range, or (at fit start) an optimizer whose param groups have
            neither ``momentum`` nor ``betas``.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[MomentumSchedule(0.5, 0.99, ramp_epochs=10)])  # doctest: +SKIP
    """

    def __init__(self, start: float = 0.5, end: float = 0.9, ramp_epochs: float = 5, interval: str = "epoch"):
        super().__init__()
        for name, value in (("start", start), ("end", end)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"`{name}` must be in [0, 1), got {value}.")
        if not ramp_epochs > 0:
            raise ValueError(f"`ramp_epochs` must be > 0, got {ramp_epochs}.")
        if interval not in ("epoch", "step"):
            raise ValueError(f"`interval` must be 'epoch' or 'step', got {interval!r}.")
        self.start = start
        self.end = end
        self.ramp_epochs = ramp_epochs
        self.interval = interval
        self._skip: set[int] = set()

    def momentum_at(self, t: float) -> float:
        """Momentum at (fractional) epoch ``t``."""
        return self.start + (self.end - self.start) * min(max(t, 0.0) / self.ramp_epochs, 1.0)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._skip = set()
        for config in trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if isinstance(scheduler, (OneCycleLR, CyclicLR)) and getattr(scheduler, "cycle_momentum", False):
                rank_zero_warn(
                    f"{type(scheduler).__name__}(cycle_momentum=True) already drives the momentum;"
                    " MomentumSchedule leaves that optimizer alone."
                    " Pass `cycle_momentum=False` to use the ramp."
                )
                self._skip.add(id(scheduler.optimizer))
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                if "momentum" not in group and "betas" not in group:
                    raise ValueError(
                        f"MomentumSchedule needs param groups with `momentum` (SGD) or `betas` (Adam family);"
                        f" {type(optimizer).__name__} has neither."
                    )

    def _apply(self, trainer: pl.Trainer, t: float) -> None:
        value = self.momentum_at(t)
        for optimizer in trainer.optimizers:
            if id(optimizer) in self._skip:
                continue
            for group in optimizer.param_groups:
                if "momentum" in group:
                    group["momentum"] = value
                else:
                    group["betas"] = (value, *tuple(group["betas"])[1:])

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.interval == "epoch":
            self._apply(trainer, float(trainer.current_epoch))

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: object, batch_idx: int
    ) -> None:
        if self.interval == "step":
            batches = trainer.num_training_batches
            fraction = batch_idx / batches if batches and batches != float("inf") else 0.0
            self._apply(trainer, trainer.current_epoch + fraction)
