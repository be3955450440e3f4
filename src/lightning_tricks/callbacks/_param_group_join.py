"""Add param groups to an optimizer that LR schedulers already drive, at the schedule's current position.

``Optimizer.add_param_group`` leaves torch's schedulers behind: they keep one ``base_lrs`` entry (and one
``LambdaLR`` factor, one ``CyclicLR`` peak...) per group they were built with, so a new group's lr would never
follow the schedule. Hand-written because torch has no API to extend a running scheduler.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lightning_tricks._lightning_compat import child_schedulers, set_last_lr

# Per-group lists of schedulers whose new entries copy the reference group's (group 0), scaled by lr ratio.
_SCALED_LISTS = ("base_lrs", "max_lrs")
# Per-group lists whose new entries copy the reference group's as is.
_COPIED_LISTS = ("lr_lambdas", "min_lrs", "base_momentums", "max_momentums")
# Keys schedulers keep in each param group: lr values (scaled by the lr ratio) and momentum bounds (copied).
_SCALED_GROUP_KEYS = ("initial_lr", "max_lr", "min_lr")
_COPIED_GROUP_KEYS = ("base_momentum", "max_momentum")


def _nested(schedulers: Iterable[Any]) -> list[Any]:
    found, pending = [], list(schedulers)
    while pending:
        scheduler = pending.pop()
        found.append(scheduler)
        pending.extend(child_schedulers(scheduler))
    return found


def extend_schedulers(schedulers: Iterable[Any], ratios: list[float], lrs: list[float]) -> None:
    """Give every scheduler (nested ones too) one more entry per new param group.

    Args:
        schedulers: schedulers driving the optimizer.
        ratios: per new group, its nominal lr over the reference group's (group 0) nominal lr.
        lrs: per new group, its current lr (what ``get_last_lr`` reports for it).
    """
    for scheduler in _nested(schedulers):
        for name in _SCALED_LISTS:
            values = getattr(scheduler, name, None)
            if isinstance(values, list) and values:
                values.extend(float(values[0]) * r for r in ratios)
        for name in _COPIED_LISTS:
            values = getattr(scheduler, name, None)
            if isinstance(values, list) and values:
                values.extend(values[0] for _ in ratios)
        try:
            last = scheduler.get_last_lr()
        except AttributeError:  # not stepped yet, or no such method (ReduceLROnPlateau before torch 2.2)
            continue
        set_last_lr(scheduler, [*last, *lrs])


def nominal_lr(group: dict[str, Any]) -> float:
    """The lr a param group was configured with: OneCycleLR's peak ``max_lr`` (it starts at
    ``max_lr / div_factor``), else the schedule's starting ``initial_lr``, else the current ``lr``."""
    return float(group.get("max_lr", group.get("initial_lr", group["lr"])))


def add_param_groups(
    optimizer: torch.optim.Optimizer, schedulers: Iterable[Any], groups: list[dict[str, Any]]
) -> None:
    """Add ``groups`` (each with its nominal ``lr``, i.e. the lr it would have at the schedule's start) to
    ``optimizer``, scaled to where the schedule is now, and extend ``schedulers`` so they drive them.

    Where the reference group (group 0) is now at ``lr / nominal = f`` of its nominal rate, a new group
    gets ``nominal * f``; OneCycleLR's per-group ``max_lr``/``min_lr`` follow in proportion, its momentum
    bounds are copied.

    Example::

        add_param_groups(optimizer, [scheduler], [{"params": head.parameters(), "lr": 0.01}])
    """
    if not groups:
        return
    ref = optimizer.param_groups[0]
    ref_nominal = nominal_lr(ref)
    position = float(ref["lr"]) / ref_nominal
    ratios, lrs = [], []
    for group in groups:
        nominal = float(group["lr"])
        ratio = nominal / ref_nominal
        new = {**group, "lr": nominal * position}
        for key in _SCALED_GROUP_KEYS:
            if key in ref:
                new[key] = float(ref[key]) * ratio
        for key in _COPIED_GROUP_KEYS:
            if key in ref:
                new[key] = ref[key]
        optimizer.add_param_group(new)
        ratios.append(ratio)
        lrs.append(new["lr"])
    extend_schedulers(schedulers, ratios, lrs)
