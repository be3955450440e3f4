"""Loss-curve arithmetic for the LR range test: smoothing, divergence tracking and suggestion rules.

Pure functions on sequences of floats so each rule can be checked on hand-built curves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from lightning_tricks.callbacks._explosion import ExplosionRule
from lightning_tricks.callbacks._smoothing import MetricSmoother

SUGGESTIONS = ("steepest", "min_div_10", "valley")
MODES = ("exponential", "linear")


def lr_schedule(min_lr: float, max_lr: float, num_steps: int, mode: str) -> list[float]:
    """Learning rates of the range test: ``num_steps`` values from ``min_lr`` to ``max_lr`` inclusive.

    Example:

        >>> [round(lr, 12) for lr in lr_schedule(1e-4, 1.0, 5, "exponential")]
        [0.0001, 0.001, 0.01, 0.1, 1.0]
        >>> lr_schedule(0.0, 1.0, 3, "linear")
        [0.0, 0.5, 1.0]
    """
    if mode == "exponential":
        return torch.logspace(math.log10(min_lr), math.log10(max_lr), num_steps, dtype=torch.float64).tolist()
    return torch.linspace(min_lr, max_lr, num_steps, dtype=torch.float64).tolist()


class SmoothedLossTracker:
    """Bias-corrected EMA of the loss (:class:`MetricSmoother`) with the shared explosion rule.

    ``t`` counts finite losses only: a NaN/inf loss is dropped instead of poisoning every later average.
    The search has diverged once the smoothed loss exceeds ``divergence_factor`` times its first value
    (:class:`ExplosionRule`, the same rule early stopping and the diagnostics apply).

    Example:

        >>> tracker = SmoothedLossTracker(alpha=0.5, divergence_factor=4.0)
        >>> tracker.update(2.0), tracker.update(1.0)  # bias-corrected: (0.5*2 + 1) / 1.5 ... = 4/3
        ((2.0, False), (1.3333333333333333, False))
        >>> tracker.update(float("nan")), tracker.update(50.0)  # NaN dropped; 4x the first -> diverged
        ((None, False), (29.142857142857142, True))
    """

    def __init__(self, alpha: float, divergence_factor: float | None) -> None:
        self.alpha = alpha
        self.divergence_factor = divergence_factor
        self._smoother = MetricSmoother("ema", alpha=alpha)
        self._explosion = None if divergence_factor is None else ExplosionRule(divergence_factor)

    def update(self, loss: float) -> tuple[float | None, bool]:
        """Add one raw loss; return ``(smoothed or None if dropped, diverged)``."""
        if not math.isfinite(loss):
            return None, False
        smoothed = self._smoother.update(loss)
        return smoothed, self._explosion is not None and self._explosion.update(smoothed)


def _trim(lrs: Sequence[float], losses: Sequence[float], skip_begin: int, skip_end: int) -> tuple[int, int]:
    stop = len(losses) - skip_end
    if stop - skip_begin < 2:  # too few points to trim: use the whole curve rather than nothing
        return 0, len(losses)
    return skip_begin, stop


def suggest_steepest(
    lrs: Sequence[float], losses: Sequence[float], skip_begin: int = 0, skip_end: int = 0
) -> int:
    """Index of the steepest descent of ``losses`` with respect to ``log(lr)`` (central differences).

    Example:

        >>> suggest_steepest([1e-4, 1e-3, 1e-2, 1e-1, 1.0], [2.3, 2.2, 1.2, 0.9, 3.0])
        2
    """
    start, stop = _trim(lrs, losses, skip_begin, skip_end)
    loss = torch.tensor(losses[start:stop], dtype=torch.float64)
    log_lr = torch.tensor(lrs[start:stop], dtype=torch.float64).log()
    grad = torch.gradient(loss, spacing=(log_lr,))[0]
    return start + int(torch.argmin(grad))


def suggest_min_div_10(
    lrs: Sequence[float], losses: Sequence[float], skip_begin: int = 0, skip_end: int = 0
) -> int:
    """Index of the minimum loss; the suggested learning rate is ``lrs[idx] / 10``.

    Example:

        >>> lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
        >>> lrs[suggest_min_div_10(lrs, [2.3, 2.2, 1.2, 0.9, 3.0])] / 10
        0.01
    """
    start, stop = _trim(lrs, losses, skip_begin, skip_end)
    return start + int(torch.argmin(torch.tensor(losses[start:stop], dtype=torch.float64)))


def suggest_valley(
    lrs: Sequence[float], losses: Sequence[float], skip_begin: int = 0, skip_end: int = 0
) -> int:
    """fastai's ``valley``: the middle of the longest decreasing subsequence of the loss curve.

    Hand-written (no torch equivalent): an O(n^2) longest-decreasing-subsequence over at most a few
    thousand points, following fastai's ``valley`` exactly (start = end - length, pick start + length / 2).

    Example:

        >>> suggest_valley(list(range(1, 9)), [3.0, 2.8, 2.5, 2.1, 1.6, 1.2, 1.1, 4.0])  # run 0..6
        2
    """
    start, stop = _trim(lrs, losses, skip_begin, skip_end)
    values = list(losses[start:stop])
    n = len(values)
    run = [1] * n
    best_start, best_end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if values[i] < values[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
            if run[best_end] < run[i]:
                best_end = i
                best_start = best_end - run[best_end]
    section = (best_end - best_start) / 3
    return start + best_start + int(section) + int(section / 2)


def suggest_indices(
    lrs: Sequence[float], losses: Sequence[float], skip_begin: int = 0, skip_end: int = 0
) -> dict[str, int]:
    """Curve index each rule picks (``min_div_10``: the minimum, whose lr is then divided by 10).

    Example:

        >>> suggest_indices([1e-4, 1e-3, 1e-2, 1e-1, 1.0], [2.3, 2.2, 1.2, 0.9, 3.0])
        {'steepest': 2, 'min_div_10': 3, 'valley': 0}
    """
    if len(losses) == 0:
        return {}
    args = (lrs, losses, skip_begin, skip_end)
    return {
        "steepest": suggest_steepest(*args) if len(losses) >= 2 else 0,
        "min_div_10": suggest_min_div_10(*args),
        "valley": suggest_valley(*args),
    }


def suggest_all(
    lrs: Sequence[float], losses: Sequence[float], skip_begin: int = 0, skip_end: int = 0
) -> dict[str, float]:
    """All three suggestions as learning rates, keyed by rule name.

    Example:

        >>> suggest_all([1e-4, 1e-3, 1e-2, 1e-1, 1.0], [2.3, 2.2, 1.2, 0.9, 3.0])
        {'steepest': 0.01, 'min_div_10': 0.01, 'valley': 0.0001}
    """
    indices = suggest_indices(lrs, losses, skip_begin, skip_end)
    return {name: float(lrs[idx]) / (10.0 if name == "min_div_10" else 1.0) for name, idx in indices.items()}


def refusal_reason(
    lrs: Sequence[float],
    losses: Sequence[float],
    index: int,
    skip_begin: int,
    skip_end: int,
    min_points: int,
    min_loss_drop: float,
) -> str | None:
    """Why the suggestion at ``index`` of the smoothed curve must not be applied, or ``None``.

    Refused: a curve with fewer than ``min_points`` finite points (the loss diverged at once: the range
    starts too high), a curve whose smoothed loss never falls ``min_loss_drop`` (relative) below its first
    value (flat: the range is too low to train), and a suggestion on the first or last point the rules
    looked at (the best value probably lies outside the range).

    Example:

        >>> refusal_reason([1e4, 1e5], [30.0, 900.0], 0, 0, 0, min_points=10, min_loss_drop=0.05)
        'only 2 finite loss points (at least 10 needed); ... min_lr=1e+04 is probably already too high: ...'
    """
    n = len(losses)
    if n < min_points:
        return (
            f"only {n} finite loss points (at least {min_points} needed); the loss diverged right away, "
            f"so min_lr={lrs[0] if n else float('nan'):.3g} is probably already too high: lower min_lr"
        )
    start, stop = _trim(lrs, losses, skip_begin, skip_end)
    first, lowest = losses[start], min(losses[start:stop])
    if first - lowest < min_loss_drop * abs(first):
        return (
            f"the smoothed loss never fell {min_loss_drop:.0%} below its first value ({first:.4g} -> lowest "
            f"{lowest:.4g}) between lr={lrs[start]:.3g} and lr={lrs[stop - 1]:.3g}: the curve is flat, the "
            "range is too low to train; raise max_lr"
        )
    if index <= start:
        return (
            f"the suggestion is the first point of the range (lr={lrs[index]:.3g}); the best rate is "
            "probably lower: lower min_lr"
        )
    if index >= stop - 1:
        return (
            f"the suggestion is the last point of the range (lr={lrs[index]:.3g}); the loss was still "
            "falling there: raise max_lr"
        )
    return None
