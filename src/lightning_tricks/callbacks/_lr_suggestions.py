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

    Example::

        lr_schedule(1e-4, 1.0, 5, "exponential")  # [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    """
    if mode == "exponential":
        return torch.logspace(math.log10(min_lr), math.log10(max_lr), num_steps, dtype=torch.float64).tolist()
    return torch.linspace(min_lr, max_lr, num_steps, dtype=torch.float64).tolist()


class SmoothedLossTracker:
    """Bias-corrected EMA of the loss (:class:`MetricSmoother`) with the shared explosion rule.

    ``t`` counts finite losses only: a NaN/inf loss is dropped instead of poisoning every later average.
    The search has diverged once the smoothed loss exceeds ``divergence_factor`` times its first value
    (:class:`ExplosionRule`, the same rule early stopping and the diagnostics apply).

    Example::

        tracker = SmoothedLossTracker(alpha=0.1, divergence_factor=4.0)
        smoothed, diverged = tracker.update(2.3)
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

    Example::

        idx = suggest_steepest(lrs, smoothed_losses)
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

    Example::

        lr = lrs[suggest_min_div_10(lrs, smoothed_losses)] / 10
    """
    start, stop = _trim(lrs, losses, skip_begin, skip_end)
    return start + int(torch.argmin(torch.tensor(losses[start:stop], dtype=torch.float64)))


def suggest_valley(
    lrs: Sequence[float], losses: Sequence[float], skip_begin: int = 0, skip_end: int = 0
) -> int:
    """fastai's ``valley``: the middle of the longest decreasing subsequence of the loss curve.

    Hand-written (no torch equivalent): an O(n^2) longest-decreasing-subsequence over at most a few
    thousand points, following fastai's ``valley`` exactly (start = end - length, pick start + length / 2).

    Example::

        idx = suggest_valley(lrs, smoothed_losses)
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


def suggest_all(
    lrs: Sequence[float], losses: Sequence[float], skip_begin: int = 0, skip_end: int = 0
) -> dict[str, float]:
    """All three suggestions as learning rates, keyed by rule name.

    Example::

        suggest_all(lrs, smoothed_losses)  # {"steepest": ..., "min_div_10": ..., "valley": ...}
    """
    if len(losses) == 0:
        return {}
    args = (lrs, losses, skip_begin, skip_end)
    return {
        "steepest": float(lrs[suggest_steepest(*args)]) if len(losses) >= 2 else float(lrs[0]),
        "min_div_10": float(lrs[suggest_min_div_10(*args)]) / 10.0,
        "valley": float(lrs[suggest_valley(*args)]),
    }
