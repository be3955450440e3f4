"""What the recipe does when a training step's loss is NaN or infinite: stop (default) or skip the step.

The check runs before ``backward``, so a non-finite loss never reaches the weights, the optimizer
state or a checkpoint: the last checkpoint written stays the last good one. Under DDP every rank
takes the same decision (one boolean all-reduce), so no rank waits for a gradient that never comes.
Costs one device-to-host read of the loss per step.

Example::

    guard = NonFiniteLossGuard("stop")
    if not guard.check(module, loss, images, batch_idx):  # raises for "stop"
        return None  # "skip": Lightning skips backward and the optimizer step
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

NONFINITE_ACTIONS = ("stop", "skip")


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN or infinite loss and the run was stopped."""


class NonFiniteLossGuard:
    """Tracks the last finite training loss and acts on a non-finite one.

    Args:
        action: ``"stop"`` raises :class:`NonFiniteLossError`; ``"skip"`` warns and skips the step.

    Example::

        guard = NonFiniteLossGuard("skip")
    """

    def __init__(self, action: str = "stop") -> None:
        if action not in NONFINITE_ACTIONS:
            raise ValueError(
                f"on_nonfinite_loss must be one of {NONFINITE_ACTIONS}, got {action!r}; "
                "e.g. model.init_args.on_nonfinite_loss=skip"
            )
        self.action = action
        self.last_finite: tuple[int, float] | None = None
        self.skipped_steps: list[int] = []

    def check(
        self, module: L.LightningModule, loss: torch.Tensor, images: torch.Tensor, batch_idx: int
    ) -> bool:
        """``True`` when the step may proceed; a non-finite loss raises (stop) or gives ``False`` (skip)."""
        value = float(loss.detach())
        finite = math.isfinite(value)
        try:
            trainer = module.trainer
        except RuntimeError:  # a step called by hand, outside a Trainer
            trainer = None
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        step = trainer.global_step if trainer is not None else 0
        if finite:
            self.last_finite = (step, value)
            return True
        epoch = trainer.current_epoch if trainer is not None else 0
        message = self._message(value, step, epoch, batch_idx, images)
        if self.action == "stop":
            raise NonFiniteLossError(message)
        self.skipped_steps.append(step)
        rank_zero_warn(f"{message} Skipped this step (on_nonfinite_loss=skip).")
        return False

    def _message(self, value: float, step: int, epoch: int, batch_idx: int, images: torch.Tensor) -> str:
        last = (
            f"the last finite loss was {self.last_finite[1]:.6g} at step {self.last_finite[0]}"
            if self.last_finite is not None
            else "no step before it had a finite loss"
        )
        bad_inputs = images.is_floating_point() and not bool(torch.isfinite(images).all())
        cause = (
            "the batch itself contains NaN/inf values: bad input data (check the dataset and its "
            "preprocessing)"
            if bad_inputs
            else "the inputs are finite, so most likely the learning rate is too high (lower "
            "optimizer.lr or add a warm-up) or the loss/weights overflowed (mixed precision, no "
            "gradient clipping)"
        )
        return (
            f"Non-finite training loss {value} at step {step} (epoch {epoch}, batch {batch_idx}); "
            f"{last}. Likely cause: {cause}."
        )
