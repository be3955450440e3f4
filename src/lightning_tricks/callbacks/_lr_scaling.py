"""Rescale every learning-rate value an optimizer and its schedulers hold, keeping the schedule's shape.

Used by :class:`~lightning_tricks.callbacks.lr_finder.LRFinder` (apply the suggested rate) and
:class:`~lightning_tricks.callbacks.optimizer_switch.OptimizerSwitch` (carry a schedule over to SGD).
Hand-written because torch has no "scale this schedule" API: the values live in the param groups
(``lr``, ``initial_lr``, OneCycleLR's ``max_lr``/``min_lr``) and in the schedulers (``base_lrs``,
CyclicLR's ``max_lrs``, the last computed rates), also inside ``SequentialLR``/``ChainedScheduler``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from lightning_tricks._lightning_compat import child_schedulers, set_last_lr

GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


def _scaled(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value.fill_(float(value) * factor)  # tensor lrs (capturable optimizers) stay the same object
    return float(value) * factor


def scale_learning_rates(
    optimizer: torch.optim.Optimizer,
    schedulers: Iterable[Any],
    factors: Sequence[float],
    group_keys: Sequence[str] = GROUP_KEYS,
) -> None:
    """Multiply each param group's learning-rate values, and the schedulers' matching entries, by its factor.

    Args:
        optimizer: the optimizer whose ``param_groups`` are rescaled in place.
        schedulers: schedulers driving ``optimizer`` (nested ones are found automatically).
        factors: one factor per param group.
        group_keys: param-group keys to rescale.

    Example:

        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
        >>> scale_learning_rates(opt, [sched], [0.5])
        >>> opt.param_groups[0]["lr"], opt.param_groups[0]["initial_lr"], sched.base_lrs, sched.get_last_lr()
        (0.05, 0.05, [0.05], [0.05])
    """
    factors = list(factors)
    if len(factors) != len(optimizer.param_groups):
        raise ValueError(f"{len(factors)} factors for {len(optimizer.param_groups)} param groups")
    for group, factor in zip(optimizer.param_groups, factors, strict=True):
        for key in group_keys:
            if key in group:
                group[key] = _scaled(group[key], factor)
    pending = list(schedulers)
    while pending:
        scheduler = pending.pop()
        pending.extend(child_schedulers(scheduler))
        for name in ("base_lrs", "max_lrs"):
            values = getattr(scheduler, name, None)
            if isinstance(values, list) and len(values) == len(factors):
                values[:] = [_scaled(v, f) for v, f in zip(values, factors, strict=True)]
        get_last_lr = getattr(scheduler, "get_last_lr", None)
        if callable(get_last_lr):
            try:
                last = get_last_lr()
            except AttributeError:  # scheduler that has not stepped yet
                continue
            if len(last) == len(factors):
                set_last_lr(scheduler, [float(v) * f for v, f in zip(last, factors, strict=True)])
