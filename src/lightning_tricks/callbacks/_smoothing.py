"""Running smoothers of a scalar series, shared by early stopping and the LR range test."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch

SMOOTHINGS = ("ema", "mean", "median")


class MetricSmoother:
    """Running smoother of a scalar series: bias-corrected EMA, or mean/median over a window.

    The EMA is bias-corrected (as in Adam): after values ``x_1..x_t`` it returns
    ``sum_k (1-alpha)^k x_{t-k} / sum_k (1-alpha)^k``, which equals pandas'
    ``Series.ewm(alpha=alpha, adjust=True).mean()``; so the first value is returned unchanged
    rather than being pulled towards zero. ``alpha=1`` returns the raw value.

    Args:
        kind: ``"ema"``, ``"mean"``, ``"median"`` or ``None`` (raw values).
        alpha: EMA weight of the newest value, in ``(0, 1]`` (``1 - beta`` in fastai's and Lightning's
            LR finders); every smoother of this library names the factor ``alpha``.
        window: number of recent values for ``"mean"``/``"median"``, at least 1.

    Raises:
        ValueError: for an unknown ``kind``, ``alpha`` outside ``(0, 1]`` or ``window`` below 1.

    Example::

        >>> s = MetricSmoother("mean", window=2)
        >>> [s.update(v) for v in (1.0, 3.0, 5.0)]
        [1.0, 2.0, 4.0]
    """

    def __init__(self, kind: str | None, alpha: float = 0.3, window: int = 5) -> None:
        if kind is not None and kind not in SMOOTHINGS:
            raise ValueError(f"`smoothing` must be one of {SMOOTHINGS} or None, got {kind!r}.")
        if not (isinstance(alpha, (int, float)) and 0.0 < alpha <= 1.0):
            raise ValueError(f"`alpha` (EMA weight of the newest value) must be in (0, 1], got {alpha!r}.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"`window` must be an integer >= 1, got {window!r}.")
        self.kind = kind
        self.alpha = alpha
        self.window = window
        self.count = 0
        self.ema = 0.0
        self.buffer: deque[float] = deque(maxlen=window)

    def update(self, value: float) -> float:
        """Adds ``value`` and returns the smoothed value."""
        self.count += 1
        if self.kind == "ema":
            self.ema = (1.0 - self.alpha) * self.ema + self.alpha * value
            return self.ema / (1.0 - (1.0 - self.alpha) ** self.count)
        self.buffer.append(value)
        if self.kind == "mean":
            return sum(self.buffer) / len(self.buffer)
        if self.kind == "median":
            # torch.median returns the lower of the two middle values; use the usual midpoint instead
            return float(torch.tensor(list(self.buffer), dtype=torch.float64).quantile(0.5))
        return value

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "ema": self.ema, "buffer": list(self.buffer)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state.get("count", 0))
        self.ema = float(state.get("ema", 0.0))
        self.buffer = deque((float(v) for v in state.get("buffer", [])), maxlen=self.window)
