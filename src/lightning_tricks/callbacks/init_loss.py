"""Check the loss at initialization against ln(C) (or the module's own expectation), and that more
regularization raises the loss.

What to expect: a freshly initialised C-class classifier should predict (close to) the uniform
distribution ``u = 1/C``. The cross-entropy of ``u`` against any target distribution ``q`` is
``-sum_k q_k log(1/C) = ln(C) * sum_k q_k = ln(C)``, because ``q`` sums to one. This holds for one-hot
labels, for label-smoothed targets under either convention (``(1-eps)`` one-hot ``+ eps/C``, or
``1-eps`` on the true class and ``eps/(C-1)`` elsewhere) and for mixup/cutmix soft targets alike, so
the expectation is ``ln(C)`` whether or not smoothing is on. (Smoothing changes the *minimum*
reachable loss, the entropy of ``q``, not the loss at uniform predictions.) Random logits with
standard deviation ``s`` raise the expected loss by roughly ``s^2/2``, which is what a too-large
initialization looks like.

A module whose data loss is not cross-entropy states its own expectation through
``expected_initial_loss()`` (see :mod:`lightning_tricks.interface`): the recipe's multi-class hinge
loss ``sum_{j != y} max(0, 1 - x_y + x_j) / C`` is ``(C-1)/C`` at near-zero logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
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
from lightning_tricks.interface import expected_initial_loss, fallback_message


@dataclass
class _Measure:
    loss_sum: float = 0.0
    count: int = 0
    num_classes: int = 0
    expected: float = math.nan  # data loss at near-zero logits
    formula: str = ""  # how ``expected`` is computed, for the report
    skip_reason: str | None = None
    base_total: float = math.nan  # data loss + penalty, regularization off
    cranked_total: float = math.nan  # data loss + penalty, regularization x factor
    base_penalty: float = math.nan  # penalty at the configured strength
    cranked_penalty: float = math.nan


class InitLossCheck(Callback):
    """Before the first optimizer step, compare the loss at initialization with ``ln(C)``.

    ``ln(C)`` is cross-entropy's value at uniform predictions; a module with another data loss gives
    its own value through ``expected_initial_loss()`` (the recipe's hinge loss: ``(C-1)/C``).

    At ``on_train_start`` (after Lightning's sanity validation, before any optimizer step) the callback
    draws ``num_batches`` batches from the training loader, sends them through
    ``trainer.strategy.batch_to_device`` (so DataModule normalisation applies), and computes the loss
    with regularization off: the module's ``data_loss(logits, targets)`` if it has one, otherwise
    ``F.cross_entropy(pl_module(x), y)``. The module is in training mode (batch-norm uses batch
    statistics, as in the first step) with dropout set to 0. The measured loss passes when
    ``|measured - expected| <= tolerance * expected``; the mean is reduced over all ranks.

    When the module offers ``regularization_scaled(factor)`` and ``penalty()`` (like
    :class:`~lightning_tricks.recipes.classifier.ImageClassifier`), it also checks that cranking the
    regularization up by ``regularization_factor`` raises the total loss ``data_loss + penalty``: if it
    does not, the penalty never reaches the loss.

    Nothing of the run is changed: parameters, buffers (batch-norm running statistics), gradients,
    training flags and dropout rates are restored bit for bit, the optimizer is untouched, and the RNG
    state is isolated. The check runs only at the start of a fresh fit (``global_step == 0``), not
    when resuming from a checkpoint.

    Args:
        num_batches: Number of training batches to average the loss over (``>= 1``).
        tolerance: Allowed relative deviation from the expected loss, in ``(0, 1]``: ``0.3`` accepts
            ``[0.7 ln C, 1.3 ln C]`` for cross-entropy.
        regularization_factor: Factor passed to ``regularization_scaled`` for the crank-up check
            (``> 1``; the lectures use 10 to 1000).
        on_fail: ``"warn"`` (default) or ``"raise"`` a
            :class:`~lightning_tricks.callbacks.sanity.SanityCheckError`.

    Attributes:
        measured: Mean loss measured at initialization (``None`` before the check or when skipped).
        expected: ``ln(C)``, or the module's ``expected_initial_loss()``.
        passed: ``True``/``False`` after the check, ``None`` when skipped.
        regularization_passed: Result of the crank-up check, ``None`` when it could not run.
        skip_reason: Why the check was skipped (for example a regression model).

    Raises:
        ValueError: On invalid arguments.

    Example::

        from lightning_tricks.callbacks.init_loss import InitLossCheck

        trainer = Trainer(callbacks=[InitLossCheck(num_batches=4, on_fail="raise")])
    """

    def __init__(
        self,
        num_batches: int = 4,
        tolerance: float = 0.3,
        regularization_factor: float = 100.0,
        on_fail: str = "warn",
    ) -> None:
        if not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"`num_batches` must be an int >= 1, got {num_batches!r}")
        if not 0 < tolerance <= 1:
            raise ValueError(
                f"`tolerance` must be in (0, 1] (relative to the expected loss), got {tolerance!r}"
            )
        if not regularization_factor > 1:
            raise ValueError(f"`regularization_factor` must be > 1, got {regularization_factor!r}; e.g. 100")
        self.num_batches = num_batches
        self.tolerance = float(tolerance)
        self.regularization_factor = float(regularization_factor)
        self.on_fail = validate_on_fail(on_fail)
        self.measured: float | None = None
        self.expected: float | None = None
        self.passed: bool | None = None
        self.regularization_passed: bool | None = None
        self.skip_reason: str | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(num_batches=self.num_batches, tolerance=self.tolerance)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Measure the loss at initialization and report."""
        if trainer.global_step > 0:
            return
        announce_fallbacks("InitLossCheck", pl_module)
        with preserved_training_state(trainer, pl_module):
            m = self._measure(trainer, pl_module)
        skip = trainer.strategy.reduce_boolean_decision(m.skip_reason is not None, all=False)
        if skip:
            self.skip_reason = m.skip_reason or "another rank could not measure a classification loss"
            rank_zero_info(f"InitLossCheck skipped: {self.skip_reason}.")
            return
        totals = torch.tensor([m.loss_sum, float(m.count)], dtype=torch.float64, device=pl_module.device)
        totals = trainer.strategy.reduce(totals, reduce_op="sum")
        self.measured = float(totals[0] / totals[1])
        self.expected = m.expected
        self.passed = abs(self.measured - self.expected) <= self.tolerance * self.expected
        self._report_loss(m.formula)
        self._report_regularization(m, pl_module)

    @torch.no_grad()
    def _measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> _Measure:
        m = _Measure()
        batches = draw_batches(trainer, num_batches=self.num_batches)
        if not batches:
            m.skip_reason = "there is no training data to measure the loss on"
            return m
        pl_module.train()
        first: tuple[Any, Any] | None = None
        with regularization_off(pl_module):
            for batch in batches:
                pair = split_batch(batch, pl_module)
                if isinstance(pair, str):
                    m.skip_reason = pair
                    return m
                x, y = pair
                logits, m.skip_reason = classifier_forward(trainer, pl_module, x, y)
                if m.skip_reason is not None:
                    return m
                if not m.formula:
                    m.num_classes = logits.shape[1]
                    m.expected, m.formula = expected_initial_loss(pl_module, m.num_classes)
                m.loss_sum += float(data_loss(pl_module, logits, y)) * logits.shape[0]
                m.count += logits.shape[0]
                if first is None:
                    first = (logits, y)
            if first is not None:
                m.base_total = float(data_loss(pl_module, *first)) + self._penalty(pl_module)
        scaled = getattr(pl_module, "regularization_scaled", None)
        if first is not None and callable(scaled) and callable(getattr(pl_module, "penalty", None)):
            m.base_penalty = self._penalty(pl_module)
            with scaled(self.regularization_factor):
                m.cranked_penalty = self._penalty(pl_module)
                m.cranked_total = float(data_loss(pl_module, *first)) + m.cranked_penalty
        return m

    @staticmethod
    def _penalty(pl_module: pl.LightningModule) -> float:
        penalty = getattr(pl_module, "penalty", None)
        return float(penalty()) if callable(penalty) else 0.0

    def _report_loss(self, formula: str) -> None:
        assert self.measured is not None and self.expected is not None
        summary = (
            f"loss at initialization {self.measured:.4f}, expected {formula} "
            f"(tolerance +-{self.tolerance:.0%})"
        )
        if self.passed:
            rank_zero_info(f"InitLossCheck passed: {summary}.")
            return
        if self.measured > self.expected:
            advice = (
                "The initial predictions are far more confident than uniform: the initial weights are too "
                "large (use He/Glorot init, or scale the last layer down, e.g. zero-init it), the inputs are "
                "not normalised, or a softmax is applied before F.cross_entropy."
            )
        else:
            advice = (
                "The model already beats uniform guessing before training: the labels may leak into the "
                "inputs, the loss may be reduced wrongly (e.g. summed vs. averaged over the wrong "
                "dimension), or the weights were loaded from a trained checkpoint."
            )
        report_failure(f"InitLossCheck failed: {summary}. {advice}", self.on_fail)

    def _report_regularization(self, m: _Measure, pl_module: pl.LightningModule) -> None:
        if math.isnan(m.cranked_total):
            message = fallback_message(
                "InitLossCheck",
                pl_module,
                ("penalty", "regularization_scaled"),
                "the check that more regularization raises the loss is skipped",
            )
            if message is not None:
                rank_zero_info(message)
            return
        if not m.base_penalty > 0 and not m.cranked_penalty > 0:
            rank_zero_info(
                "InitLossCheck: the module's penalty() is 0 (no L1/L2 loss penalty configured), so the "
                "crank-up-regularization check was skipped."
            )
            return
        self.regularization_passed = m.cranked_penalty > m.base_penalty and m.cranked_total > m.base_total
        summary = (
            f"total loss {m.base_total:.4f} without regularization and {m.cranked_total:.4f} with "
            f"regularization x{self.regularization_factor:g} (penalty {m.base_penalty:.4g} at x1 -> "
            f"{m.cranked_penalty:.4g})"
        )
        if self.regularization_passed:
            rank_zero_info(
                f"InitLossCheck: cranking up regularization raises the loss as it should: {summary}."
            )
            return
        report_failure(
            f"InitLossCheck failed: cranking up regularization did not raise the loss: {summary}. "
            "The penalty is not reaching the loss: check that penalty() uses the scaled coefficients "
            "and that regularization_scaled(factor) changes them.",
            self.on_fail,
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "measured": self.measured,
            "expected": self.expected,
            "passed": self.passed,
            "regularization_passed": self.regularization_passed,
            "skip_reason": self.skip_reason,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.measured = state_dict.get("measured")
        self.expected = state_dict.get("expected")
        self.passed = state_dict.get("passed")
        self.regularization_passed = state_dict.get("regularization_passed")
        self.skip_reason = state_dict.get("skip_reason")
