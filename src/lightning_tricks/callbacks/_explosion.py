"""The loss-explosion rule, shared by early stopping, the diagnostics and the LR range test.

One convention everywhere: a loss has exploded once it exceeds ``divergence_factor`` times its first
finite value. The first value (not the best) is the baseline because a training loss legitimately jumps
far above its best at every warm restart of a cyclic schedule, but never far above where it started
unless training diverges.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def check_divergence_factor(value: float | None, owner: str) -> None:
    """Raise a ``ValueError`` unless ``value`` is ``None`` (rule off) or a number greater than 1."""
    if value is not None and not (isinstance(value, (int, float)) and value > 1):
        raise ValueError(
            f"{owner}: `divergence_factor` must be a number > 1 (e.g. 3.0: stop at 3x the first loss)"
            f" or None to disable the explosion rule, got {value!r}."
        )


class ExplosionRule:
    """Tracks a loss series and says when it exceeds ``divergence_factor`` times its first finite value.

    Non-finite values are ignored (NaN has its own rule); a non-positive first value makes the rule
    inapplicable (:attr:`applicable` becomes ``False``), since a ratio to it means nothing.

    Example::

        >>> rule = ExplosionRule(3.0)
        >>> [rule.update(v) for v in (2.0, 1.0, 5.0, 6.5)]
        [False, False, False, True]
    """

    def __init__(self, divergence_factor: float) -> None:
        check_divergence_factor(divergence_factor, type(self).__name__)
        self.divergence_factor = float(divergence_factor)
        self.initial: float | None = None
        self.applicable = True

    @property
    def limit(self) -> float | None:
        """The value above which the loss has exploded (``None`` before the first value)."""
        return None if self.initial is None else self.divergence_factor * self.initial

    def update(self, loss: float) -> bool:
        """Add one value; ``True`` when it is above :attr:`limit`."""
        if not self.applicable or not math.isfinite(loss):
            return False
        if self.initial is None:
            self.applicable = loss > 0
            self.initial = loss if self.applicable else None
            return False
        return loss > self.divergence_factor * self.initial

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "applicable": self.applicable}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial = state.get("initial")
        self.applicable = bool(state.get("applicable", True))


def first_explosion(losses: Sequence[float], divergence_factor: float) -> int | None:
    """Index of the first value of ``losses`` that the :class:`ExplosionRule` flags, else ``None``.

    Example::

        >>> first_explosion([2.0, 1.0, 7.0], 3.0)
        2
    """
    rule = ExplosionRule(divergence_factor)
    return next((i for i, v in enumerate(losses) if rule.update(v)), None)
