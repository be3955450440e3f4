"""Check that the model, with its own optimizer, can overfit a handful of training samples."""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from typing_extensions import override

from lightning_tricks.callbacks._sanity import (
    announce_fallbacks,
    classifier_forward,
    data_loss,
    draw_batches,
    regularization_off,
    report_failure,
    split_batch,
    validate_on_fail,
)
from lightning_tricks.callbacks._training_state import preserved_training_state


class _Skip(Exception):
    """The check does not apply to this module or data."""


class _NoGradient(Exception):
    """The loss does not require a gradient."""


class OverfitTinyBatch(Callback):
    """Before training, train on ``num_samples`` fixed samples and require 100% training accuracy.

    "Make sure you can overfit a very small portion of the training data": a model that cannot
    memorise 20 samples has a bug (a frozen layer, a detached graph, labels that do not belong to
    their inputs) or a learning rate far off. Lightning's ``Trainer(overfit_batches=...)`` only
    restricts the data; this callback asserts the outcome and reports how many steps it took.

    At ``on_train_start`` it draws the first ``num_samples`` samples of the training loader once,
    through ``trainer.strategy.batch_to_device`` (so DataModule normalisation applies). These fixed,
    already-transformed tensors are reused at every step, so augmentation never re-runs. It then turns
    regularization off (``regularization_scaled(0)`` when the module offers it, every dropout ``p`` set
    to 0, the optimizer's ``weight_decay`` set to 0) and trains the model *in place* with the user's
    own first optimizer (with several optimizers, only its parameters learn), full-batch, for up to
    ``max_steps`` steps. The learning rate is the
    scheduler's base rate (``max_lr`` or ``initial_lr`` of the param group, else ``lr``) unless ``lr``
    is given. The loss is the module's ``data_loss`` or cross-entropy. It passes as soon as every
    sample is classified correctly by the training-mode forward pass, or the loss falls below
    ``loss_threshold`` when one is given.

    Afterwards parameters, buffers, gradients, training flags, optimizer state and hyperparameters
    are restored bit for bit (also when the check raises), schedulers are never stepped, RNG state is
    isolated and no hook of other callbacks fires, so the real run is exactly the run without the
    check. Runs only at the start of a fresh fit (``global_step == 0``).

    Args:
        num_samples: Number of training samples to memorise (``>= 1``).
        max_steps: Optimizer steps allowed (``>= 1``).
        loss_threshold: Also pass when the loss falls below this value (``> 0``); ``None`` requires
            100% accuracy.
        lr: Learning rate for the check (``> 0``); ``None`` uses the optimizer's base rate.
        on_fail: ``"warn"`` (default) or ``"raise"`` a
            :class:`~lightning_tricks.callbacks.sanity.SanityCheckError`.

    Attributes:
        passed: ``True``/``False`` after the check, ``None`` when skipped.
        steps: Optimizer steps needed to fit, ``None`` if it never fit.
        losses: Loss at every step of the check.
        final_accuracy: Accuracy on the samples at the end of the check.
        no_grad_parameters: Trainable parameters that received no gradient.

    Raises:
        ValueError: On invalid arguments.

    Example::

        from lightning_tricks.callbacks.overfit import OverfitTinyBatch

        trainer = Trainer(callbacks=[OverfitTinyBatch(num_samples=20, max_steps=200)])
    """

    def __init__(
        self,
        num_samples: int = 20,
        max_steps: int = 200,
        loss_threshold: float | None = None,
        lr: float | None = None,
        on_fail: str = "warn",
    ) -> None:
        if not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"`num_samples` must be an int >= 1, got {num_samples!r}")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"`max_steps` must be an int >= 1, got {max_steps!r}")
        if loss_threshold is not None and not loss_threshold > 0:
            raise ValueError(f"`loss_threshold` must be > 0 or None, got {loss_threshold!r}")
        if lr is not None and not lr > 0:
            raise ValueError(f"`lr` must be > 0 or None (the optimizer's own), got {lr!r}")
        self.num_samples = num_samples
        self.max_steps = max_steps
        self.loss_threshold = loss_threshold
        self.lr = lr
        self.on_fail = validate_on_fail(on_fail)
        self.passed: bool | None = None
        self.steps: int | None = None
        self.losses: list[float] = []
        self.final_accuracy: float | None = None
        self.no_grad_parameters: list[str] = []
        self.skip_reason: str | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(num_samples=self.num_samples, max_steps=self.max_steps)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Run the check on a fresh fit and restore everything afterwards."""
        if trainer.global_step > 0:
            return
        if not trainer.optimizers:
            self.skip_reason = "the module configures no optimizer"
            rank_zero_info(f"OverfitTinyBatch skipped: {self.skip_reason}.")
            return
        announce_fallbacks("OverfitTinyBatch", pl_module)
        failure: str | None = None
        try:
            with preserved_training_state(trainer, pl_module):
                failure = self._run(trainer, pl_module, trainer.optimizers[0])
        except _Skip as skip:
            self.skip_reason = str(skip)
        if self.skip_reason is not None:
            rank_zero_info(f"OverfitTinyBatch skipped: {self.skip_reason}.")
        elif failure is None:
            rank_zero_info(
                f"OverfitTinyBatch passed: fit {self.num_samples} samples in {self.steps} steps "
                f"(loss {self.losses[-1]:.4g})."
            )
        else:
            report_failure(f"OverfitTinyBatch failed: {failure}", self.on_fail)

    def _samples(self, trainer: pl.Trainer) -> tuple[Tensor, Tensor]:
        pairs = [
            split_batch(b, trainer.lightning_module)
            for b in draw_batches(trainer, num_samples=self.num_samples)
        ]
        if not pairs:
            raise _Skip("there is no training data")
        reason = next((p for p in pairs if isinstance(p, str)), None)
        if reason is not None:
            raise _Skip(reason)
        if not all(isinstance(p[0], Tensor) and isinstance(p[1], Tensor) for p in pairs):
            raise _Skip("batches are not (inputs, targets) tensor pairs")
        x = torch.cat([p[0] for p in pairs])[: self.num_samples]
        y = torch.cat([p[1] for p in pairs])[: self.num_samples]
        return x, y

    def _run(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> str | None:
        x, y = self._samples(trainer)
        hard = y.argmax(1) if y.ndim == 2 else y
        for group in optimizer.param_groups:
            group["lr"] = self.lr or group.get("max_lr", group.get("initial_lr", group["lr"]))
            if "weight_decay" in group:
                group["weight_decay"] = 0.0
        distributed = trainer.world_size > 1
        self.losses, self.steps, self.no_grad_parameters = [], None, []
        record: dict[str, Any] = {}

        def closure() -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            logits, reason = classifier_forward(trainer, pl_module, x, y)
            if reason is not None:
                raise _Skip(reason)
            loss = data_loss(pl_module, logits, y)
            record["loss"], record["correct"] = loss.detach(), (logits.detach().argmax(1) == hard)
            if not loss.requires_grad:
                raise _NoGradient
            loss.backward()
            if not self.no_grad_parameters and not self.losses:
                self.no_grad_parameters = [
                    n for n, p in pl_module.named_parameters() if p.requires_grad and p.grad is None
                ]
            return loss

        pl_module.train()
        with regularization_off(pl_module), torch.enable_grad():
            for step in range(self.max_steps + 1):
                try:
                    if step < self.max_steps:
                        optimizer.step(closure)
                    else:
                        with torch.no_grad():
                            logits, _ = classifier_forward(trainer, pl_module, x, y)
                        record["loss"] = data_loss(pl_module, logits, y)
                        record["correct"] = logits.argmax(1) == hard
                except _NoGradient:
                    self.passed = False
                    return (
                        "the loss does not depend on any trainable parameter, so nothing can learn. Every "
                        "parameter is frozen (requires_grad=False) or the forward pass detaches the graph "
                        "(.detach(), .item(), .numpy(), torch.no_grad() inside forward)."
                    )
                loss = float(record["loss"])
                self.losses.append(loss)
                self.final_accuracy = float(record["correct"].float().mean())
                fitted = self.final_accuracy == 1.0 or (
                    self.loss_threshold is not None and loss < self.loss_threshold
                )
                diverged = not math.isfinite(loss)
                if distributed:  # every rank steps in lockstep (SyncBatchNorm) and stops together
                    fitted = trainer.strategy.reduce_boolean_decision(fitted, all=True)
                    diverged = trainer.strategy.reduce_boolean_decision(diverged, all=False)
                if fitted:
                    self.steps, self.passed = step, True
                    return None
                if diverged:
                    self.passed = False
                    return (
                        f"the loss became {loss} after {step} steps: the learning rate is too high "
                        "(or the model/loss has a numerically unstable operation)."
                    )
        self.passed = False
        return self._explain_failure()

    def _explain_failure(self) -> str:
        first, last = self.losses[0], self.losses[-1]
        message = (
            f"after {self.max_steps} steps on {self.num_samples} fixed samples the accuracy is "
            f"{self.final_accuracy:.0%} (loss {first:.4g} -> {last:.4g}); a correct model memorises them. "
        )
        if self.no_grad_parameters:
            names = ", ".join(self.no_grad_parameters[:5])
            more = (
                "" if len(self.no_grad_parameters) <= 5 else f" and {len(self.no_grad_parameters) - 5} more"
            )
            message += (
                f"These trainable parameters got no gradient: {names}{more}; a layer is bypassed or its "
                "output is detached. "
            )
        if last > 0.9 * first:
            message += (
                "The loss barely moved: the learning rate may be far too low, layers may be frozen "
                "(requires_grad=False) or the graph detached. "
            )
        return message + (
            "Typical causes: a frozen or detached layer, a learning rate far too low or high, labels that "
            "do not match their inputs (shuffled separately, wrong label column), too little capacity. "
            "Raise `max_steps` or pass `lr` to rule out the learning rate."
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "steps": self.steps,
            "losses": list(self.losses),
            "final_accuracy": self.final_accuracy,
            "skip_reason": self.skip_reason,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.passed = state_dict.get("passed")
        self.steps = state_dict.get("steps")
        self.losses = list(state_dict.get("losses", []))
        self.final_accuracy = state_dict.get("final_accuracy")
        self.skip_reason = state_dict.get("skip_reason")
