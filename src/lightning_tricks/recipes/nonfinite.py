"""What the recipe does when a training step's loss is NaN or infinite: stop (default) or skip the step.

``"stop"`` reads nothing from the device per step: it keeps each step's loss tensor (and the sum of
its input batch, one reduction) on the device and reads them back, in one copy, only at the guard's
read points: the steps on which Lightning writes step metrics (``Trainer(log_every_n_steps)``, where
it reads the device anyway), the end of every training epoch and of training, every
:data:`MAX_PENDING_STEPS` steps, and before any checkpoint is written
(:meth:`NonFiniteLossGuard.flush` from ``on_save_checkpoint``). So a diverged run stops at most
``log_every_n_steps`` steps (and never later than its epoch end) after the first bad loss, with a
message naming that step, and no checkpoint ever holds weights updated from a non-finite loss: the
save that would write them raises instead. The weights in memory may have taken the bad updates of
those few steps (the run stops with an error; the last checkpoint is the last good one).

``"skip"`` must decide before ``backward``, so it reads the loss every step (one device-to-host copy
per step): the weights, the optimizer state and every checkpoint never see the skipped step.

Under DDP every rank takes the same decision (one boolean all-reduce per read), so no rank waits for
a gradient or a collective that never comes.

Example::

    guard = NonFiniteLossGuard("stop")
    if not guard.check(module, loss, images, batch_idx, read_now=False):  # "skip" raises or says False
        return None  # "skip": Lightning skips backward and the optimizer step
    ...
    guard.flush(module)  # at logging steps, epoch end, before checkpoints: raises for a recorded NaN
"""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn

from lightning_tricks.interface import attached_trainer

NONFINITE_ACTIONS = ("stop", "skip")
#: "stop" reads back at least this often, whatever ``log_every_n_steps`` is (bounds the kept losses).
MAX_PENDING_STEPS = 1000


class NonFiniteLossError(FloatingPointError):
    """A training step produced a NaN or infinite loss and the run was stopped."""


class NonFiniteLossGuard:
    """Tracks the last finite training loss and acts on a non-finite one.

    Args:
        action: ``"stop"`` raises :class:`NonFiniteLossError` at the guard's next read (see the module
            docstring); ``"skip"`` reads every step, warns and skips the step.

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
        # "stop": per step since the last read, the loss and input sum (on the device) and where it was.
        self._pending: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]] = []

    def check(
        self,
        module: L.LightningModule,
        loss: torch.Tensor,
        images: torch.Tensor,
        batch_idx: int,
        read_now: bool = True,
    ) -> bool:
        """``True`` when the step may proceed; a non-finite loss raises (stop) or gives ``False`` (skip).

        For ``"stop"`` the loss is recorded on its device and read back only when ``read_now`` (or outside
        a Trainer); a non-finite loss recorded earlier then raises.
        """
        trainer = attached_trainer(module)
        step = trainer.global_step if trainer is not None else 0
        epoch = trainer.current_epoch if trainer is not None else 0
        if self.action == "skip":
            return self._check_now(trainer, loss, images, (step, epoch, batch_idx))
        self._record(loss.detach(), images, (step, epoch, batch_idx))
        if read_now or trainer is None or len(self._pending) >= MAX_PENDING_STEPS:
            self.flush(module)
        return True

    # -- "stop": kept on the device, read back at the guard's checkpoints --------------------------------
    def _record(self, loss: torch.Tensor, images: torch.Tensor, where: tuple[int, int, int]) -> None:
        # No device op for the loss itself; one reduction of the inputs (a NaN/inf pixel makes the sum
        # non-finite; float32 images do not overflow) so the error can name bad input data as the cause.
        inputs = images.detach().sum() if images.is_floating_point() else loss.new_zeros(())
        self._pending.append((loss, inputs, where))

    def flush(self, module: L.LightningModule) -> None:
        """Read the pending losses back (one copy, one all-reduce under DDP); raise for a non-finite one."""
        if self.action != "stop" or not self._pending:
            return
        pending, self._pending = self._pending, []
        losses = torch.stack([loss for loss, _, _ in pending]).double()
        inputs_sums = torch.stack([inputs for _, inputs, _ in pending]).double()
        first_bad = None
        values = torch.stack([losses, inputs_sums], dim=1).tolist()  # the one device-to-host copy
        for (loss, inputs), (_, _, where) in zip(values, pending, strict=True):
            if not math.isfinite(loss):
                first_bad = (loss, not math.isfinite(inputs), where)
                break
            self.last_finite = (where[0], loss)
        trainer = attached_trainer(module)
        finite = first_bad is None
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        if first_bad is None:
            raise NonFiniteLossError(
                "Non-finite training loss on another process; that process's error names the step and cause."
            )
        value, bad_inputs, (step, epoch, batch_idx) = first_bad
        raise NonFiniteLossError(_message(value, step, epoch, batch_idx, self.last_finite, bad_inputs))

    # -- "skip": read every step -----------------------------------------------------------------------
    def _check_now(
        self, trainer: L.Trainer | None, loss: torch.Tensor, images: torch.Tensor, where: tuple[int, int, int]
    ) -> bool:
        value = float(loss.detach())
        finite = math.isfinite(value)
        if trainer is not None and trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            self.last_finite = (where[0], value)
            return True
        bad_inputs = images.is_floating_point() and not bool(torch.isfinite(images).all())
        message = _message(value, *where, self.last_finite, bad_inputs)
        self.skipped_steps.append(where[0])
        rank_zero_warn(f"{message} Skipped this step (on_nonfinite_loss=skip).")
        return False


def _message(
    value: float,
    step: int,
    epoch: int,
    batch_idx: int,
    last_finite: tuple[int, float] | None,
    bad_inputs: bool,
) -> str:
    last = (
        f"the last finite loss was {last_finite[1]:.6g} at step {last_finite[0]}"
        if last_finite is not None
        else "no step before it had a finite loss"
    )
    cause = (
        "the batch itself contains NaN/inf values: bad input data (check the dataset and its preprocessing)"
        if bad_inputs
        else "the inputs are finite, so most likely the learning rate is too high (lower optimizer.lr or "
        "add a warm-up) or the loss/weights overflowed (mixed precision, no gradient clipping)"
    )
    return (
        f"Non-finite training loss {value} at step {step} (epoch {epoch}, batch {batch_idx}); {last}. "
        f"Likely cause: {cause}."
    )
