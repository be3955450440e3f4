"""Plateau detection with torch's ``ReduceLROnPlateau`` rule, so that a callback waiting for a plateau
and the ``plateau`` LR schedule agree on what a plateau is."""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau


class PlateauDetector:
    """Says when a metric has not improved by more than ``min_delta`` for ``patience`` checks in a row.

    The decision is torch's ``ReduceLROnPlateau(mode, patience=patience - 1, threshold=min_delta,
    threshold_mode="abs")``, run on a one-parameter stand-in optimizer: a plateau is a step at which that
    scheduler would lower the learning rate. (torch offers the rule only inside the scheduler.)

    Example::

        >>> detector = PlateauDetector("min", patience=2)
        >>> [detector.update(v) for v in (1.0, 0.5, 0.6, 0.7)]
        [False, False, False, True]
    """

    def __init__(self, mode: str, patience: int, min_delta: float = 0.0) -> None:
        self._optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        self._rule = ReduceLROnPlateau(
            self._optimizer,
            mode=mode,
            factor=0.5,
            patience=patience - 1,
            threshold=min_delta,
            threshold_mode="abs",
        )

    @property
    def best(self) -> float:
        """Best value so far (``inf``/``-inf`` before any)."""
        return float(self._rule.best)

    @property
    def wait_count(self) -> int:
        """Checks since the last improvement (reset when a plateau is reported)."""
        return int(self._rule.num_bad_epochs)

    def update(self, value: float) -> bool:
        """Add one check; ``True`` when it completes a plateau."""
        lr = self._optimizer.param_groups[0]["lr"]
        self._rule.step(value)
        if self._optimizer.param_groups[0]["lr"] < lr:
            self._optimizer.param_groups[0]["lr"] = lr  # only the decision matters, never run out of rate
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return self._rule.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._rule.load_state_dict(state)
