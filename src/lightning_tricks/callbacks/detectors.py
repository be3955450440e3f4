"""Pure detectors of training problems: functions over sequences of numbers that return a
:class:`Finding` (what was seen, the likely cause, the fix) or ``None``.

They apply to any curve and are unit-tested on synthetic ones; :class:`TrainingDiagnostics` records the
curves of a run and calls them.

Example::

    from lightning_tricks.callbacks.detectors import detect_flat

    detect_flat([2.30, 2.30, 2.29, 2.30, 2.30, 2.29, 2.30, 2.30])  # -> Finding(check="flat", ...)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_tricks.callbacks._explosion import first_explosion
from lightning_tricks.interface import cross_entropy_initial_loss

SEVERITIES: tuple[str, ...] = ("error", "warning", "not checked")


@dataclass
class Finding:
    """One problem seen in the curves.

    Args:
        check: Short name of the detector (``"nan"``, ``"explosion"``, ``"flat"``, ...).
        severity: ``"error"`` (the run is broken), ``"warning"`` (the run is likely wasting time) or
            ``"not checked"`` (the check found no data to judge; the message says why).
        message: What was seen, with numbers.
        cause: The likely cause, in one sentence.
        fix: What to do, in one sentence.

    Example::

        Finding("flat", "warning", "loss 2.30 -> 2.29", "learning rate too low", "raise it 3-10x")
    """

    check: str
    severity: str
    message: str
    cause: str
    fix: str


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def detect_nonfinite(losses: Sequence[float], name: str = "training loss") -> Finding | None:
    """Flag the first NaN or infinite loss.

    Example::

        detect_nonfinite([2.3, 1.9, float("nan")]).message  # "the training loss became nan at point 2"
    """
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            return Finding(
                "nan",
                "error",
                f"the {name} became {value} at point {i}",
                "the learning rate is too high, or an operation overflows (log of 0, division by 0, fp16)",
                "lower the learning rate 3-10x, add warm-up or gradient clipping, check the loss for log(0)",
            )
    return None


def detect_explosion(
    losses: Sequence[float], divergence_factor: float = 3.0, name: str = "training loss"
) -> Finding | None:
    """Flag a loss that exceeds ``divergence_factor`` times its first finite value (:class:`ExplosionRule`,
    the rule early stopping and the LR range test apply too).

    Example::

        detect_explosion([2.3, 1.9, 7.5]).check  # "explosion": 7.5 > 3 * 2.3
    """
    index = first_explosion(losses, divergence_factor)
    if index is None:
        return None
    first = next(v for v in losses if math.isfinite(v))
    return Finding(
        "explosion",
        "error",
        f"the {name} rose to {losses[index]:.4g} at point {index}, more than {divergence_factor:g}x its first"
        f" value {first:.4g}",
        "the learning rate is too high, so the updates overshoot and diverge",
        "lower the learning rate by 3-10x (or add warm-up / gradient clipping)",
    )


def detect_flat(
    losses: Sequence[float],
    min_decrease: float = 0.05,
    window: int | None = None,
    name: str = "training loss",
) -> Finding | None:
    """Flag a loss whose last window is not ``min_decrease`` (relative) below its first window.

    ``window`` defaults to a fifth of the curve; curves shorter than two windows (or 4 points) pass.

    Example::

        detect_flat([2.30, 2.31, 2.29, 2.30, 2.30]).check  # "flat"
    """
    values = _finite(losses)
    window = window or max(1, len(values) // 5)
    if len(values) < max(4, 2 * window):
        return None
    start = sum(values[:window]) / window
    end = sum(values[-window:]) / window
    if start <= 0:
        return None
    decrease = (start - end) / start
    if decrease < min_decrease:
        return Finding(
            "flat",
            "warning",
            f"the {name} went from {start:.4g} to {end:.4g} ({decrease:+.1%}) over {len(values)} points",
            "the learning rate is too low (or the gradients do not reach the weights)",
            "raise the learning rate by 3-10x or run an LR range test; check that layers are not frozen",
        )
    return None


def detect_overfitting(
    train_losses: Sequence[float], val_losses: Sequence[float], patience: int = 2, min_rise: float = 0.02
) -> Finding | None:
    """Flag validation loss rising for ``patience`` evaluations past its minimum while training loss falls.

    ``train_losses[i]`` is the training loss over the period that ended at evaluation ``i``.

    Example::

        detect_overfitting([2.0, 1.0, 0.6, 0.3], [2.1, 1.2, 1.4, 1.6]).check  # "overfitting"
    """
    n = min(len(train_losses), len(val_losses))
    if n < patience + 1:
        return None
    train, val = list(train_losses[:n]), list(val_losses[:n])
    if not all(math.isfinite(v) for v in val + train):
        return None
    best = min(range(n), key=val.__getitem__)
    if n - 1 - best >= patience and val[-1] > val[best] * (1 + min_rise) and train[-1] < train[best]:
        return Finding(
            "overfitting",
            "warning",
            f"validation loss rose from {val[best]:.4g} (evaluation {best}) to {val[-1]:.4g} while training "
            f"loss fell from {train[best]:.4g} to {train[-1]:.4g}",
            "the model is memorising the training set (overfitting)",
            "add regularization (weight decay, dropout, augmentation), get more data, or stop early",
        )
    return None


def detect_underfitting(
    train_loss: float, val_loss: float, reference: float, max_fraction: float = 0.5, max_gap: float = 0.1
) -> Finding | None:
    """Flag final losses that are both still above ``max_fraction * reference`` and close to each other.

    ``reference`` is the loss at initialization (or ``ln C`` for a C-class classifier).

    Example::

        detect_underfitting(1.8, 1.85, reference=2.3).check  # "underfitting"
    """
    values = (train_loss, val_loss, reference)
    if not all(math.isfinite(v) for v in values) or reference <= 0 or train_loss <= 0:
        return None
    gap = abs(val_loss - train_loss) / train_loss
    if train_loss > max_fraction * reference and gap <= max_gap:
        return Finding(
            "underfitting",
            "warning",
            f"training loss {train_loss:.4g} and validation loss {val_loss:.4g} are close ({gap:.0%} apart) "
            f"and still above {max_fraction:.0%} of the initial {reference:.4g}",
            "the model is underfitting: too little capacity, too few steps, or too much regularization",
            "train longer, use a bigger model, or reduce regularization",
        )
    return None


def detect_init_loss(
    initial_loss: float,
    num_classes: int,
    tolerance: float = 0.5,
    expected: tuple[float, str] | None = None,
) -> Finding | None:
    """Flag an initial loss more than ``tolerance`` (relative) away from the expected one.

    ``expected`` is ``(value, formula)`` (see :func:`lightning_tricks.interface.expected_initial_loss`);
    by default cross-entropy's ``ln(num_classes)``.

    Example::

        detect_init_loss(9.0, num_classes=10).check  # "init_loss": ln(10) = 2.3026
        detect_init_loss(9.0, 10, expected=(0.9, "(C-1)/C = 9/10 = 0.9000 for the multi-class hinge loss"))
    """
    if num_classes < 2 or not math.isfinite(initial_loss):
        return None
    value, formula = expected or cross_entropy_initial_loss(num_classes)
    if abs(initial_loss - value) > tolerance * value:
        return Finding(
            "init_loss",
            "warning",
            f"the loss at initialization is {initial_loss:.4g}, expected about {formula}",
            "the initial predictions are far from uniform (too-large initial weights or un-normalised inputs)"
            if initial_loss > value
            else "the model beats chance before training (labels leak into inputs, or trained weights)",
            "use He/Glorot initialization with a small last layer and normalised inputs",
        )
    return None


def detect_variance_drift(
    variances: Sequence[float],
    layers: Sequence[str] | None = None,
    factor: float = 100.0,
    kind: str = "activation",
) -> Finding | None:
    """Flag a variance that grows or shrinks by more than ``factor`` from the first to the last layer.

    ``variances`` are in the order the signal flows: forward order for activations, backward order
    (last layer first) for gradients.

    Example::

        detect_variance_drift([1.0, 100.0, 1e4], ["fc1", "fc2", "fc3"]).message  # "... grows 1e+04x ..."
    """
    values = list(variances)
    if len(values) < 2 or not all(math.isfinite(v) for v in values) or values[0] <= 0:
        return None
    ratio = values[-1] / values[0]
    if 1 / factor <= ratio <= factor:
        return None
    names = list(layers) if layers is not None else [str(i) for i in range(len(values))]
    direction = "grows" if ratio > factor else "shrinks"
    return Finding(
        f"{kind}_variance",
        "warning",
        f"the {kind} variance {direction} {ratio:.3g}x from {names[0]} ({values[0]:.3g}) to {names[-1]} "
        f"({values[-1]:.3g}) at initialization",
        f"the weight initialization does not preserve the signal "
        f"({'exploding' if ratio > 1 else 'vanishing'} {kind}s)",
        "use He (ReLU) or Glorot (tanh) initialization, or add normalization layers",
    )
