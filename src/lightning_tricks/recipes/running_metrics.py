"""A weighted running mean for per-step training metrics, cheap enough to update every step.

torchmetrics' ``MeanMetric`` and ``MulticlassAccuracy`` check and reformat their inputs on every
update (NaN checks and argument validation read the device); for the recipe's own loss and
accuracy, whose inputs it produces itself, that costs about eight times the two in-place additions
this metric does. It is still a torchmetrics ``Metric``: Lightning logs it, computes it at the epoch
end, torchmetrics sums its states across processes under DDP, and its states are in the module's
``state_dict`` (the names of ``MeanMetric``'s: ``mean_value`` holds the weighted sum, ``weight`` the
total weight).

Example::

    accuracy = RunningMean()
    accuracy.update((logits.argmax(1) == targets).sum(), len(targets))  # correct count, batch size
    accuracy.compute()  # fraction correct over every update since the last reset
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class RunningMean(Metric):
    """``sum(totals) / sum(weights)`` over the updates since the last reset.

    Example::

        loss = RunningMean()
        loss.update(batch_loss * len(images), len(images))  # batch-size weighted, as Lightning's mean
    """

    full_state_update = False
    mean_value: Tensor
    weight: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.add_state("mean_value", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("weight", default=torch.tensor(0.0), dist_reduce_fx="sum")

    def update(self, total: Tensor, weight: float) -> None:
        """Add ``total`` (already multiplied by its weight) and ``weight``."""
        self.mean_value += total
        self.weight += weight

    def compute(self) -> Tensor:
        return self.mean_value / self.weight
