"""Exponential moving average over fixed lists of tensors, and the EMA decay warm-up schedules.

Everything here is module level (no closures), so objects holding these functions pickle under
``ddp_spawn``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

WARMUPS = ("num_updates", "power", "progress")


def ema_decay(
    decay: float,
    num_updates: int,
    warmup: str | None = None,
    warmup_gamma: float = 1.0,
    warmup_power: float = 2 / 3,
    progress: float = 1.0,
) -> float:
    """Decay applied by the update that follows ``num_updates`` earlier updates.

    ``num_updates == 0`` is the first update, which copies the live weights (decay 0), as
    :class:`torch.optim.swa_utils.AveragedModel` does. After that:

    - ``warmup=None``: ``decay``;
    - ``warmup="num_updates"`` (torch-ema's ``use_num_updates``): ``min(decay, (1 + t) / (10 + t))``;
    - ``warmup="power"`` (timm's ``ModelEmaV3(use_warmup=True)``):
      ``min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)``,
    - ``warmup="progress"`` (airbench's lookahead schedule): ``decay * progress ** warmup_power``, with
      ``progress`` the fraction of the run's optimizer steps done (airbench: ``0.95 ** 5 * progress ** 3``),

    with ``t = num_updates``.

    Example::

        >>> ema_decay(0.999, 0)
        0.0
        >>> round(ema_decay(0.999, 1, warmup="num_updates"), 4)
        0.1818
    """
    if num_updates <= 0:
        return 0.0
    if warmup is None:
        return decay
    if warmup == "num_updates":
        return min(decay, (1 + num_updates) / (10 + num_updates))
    if warmup == "power":
        return min(decay, 1.0 - (1.0 + num_updates / warmup_gamma) ** -warmup_power)
    if warmup == "progress":
        return decay * min(max(progress, 0.0), 1.0) ** warmup_power
    raise ValueError(f"`warmup` must be one of {(None, *WARMUPS)}, got {warmup!r}.")


class TensorListEMA:
    """In-place EMA of ``average`` towards ``live``, two aligned lists of tensors fixed once.

    Floating-point pairs selected by ``averaged`` are grouped by (device, dtype) at construction,
    so an update is one ``torch._foreach_lerp_`` per group with no per-call dict or list building.
    Other pairs (integer buffers such as ``num_batches_tracked``, or buffers excluded from
    averaging) are copied. ``torch._foreach_lerp_`` is hand-picked over ``AveragedModel.update_parameters``
    because the latter rebuilds and regroups the lists and syncs on ``n_averaged`` at every call.

    Example::

        >>> avg, live = [torch.zeros(3)], [torch.ones(3)]
        >>> ema = TensorListEMA(avg, live)
        >>> ema.update(decay=0.75)
        >>> avg[0]
        tensor([0.2500, 0.2500, 0.2500])
    """

    def __init__(
        self, average: Sequence[Tensor], live: Sequence[Tensor], averaged: Sequence[bool] | None = None
    ) -> None:
        if len(average) != len(live):
            raise ValueError(f"`average` and `live` must align, got {len(average)} and {len(live)} tensors.")
        averaged = [True] * len(average) if averaged is None else list(averaged)
        self.average = [t.detach() for t in average]
        self.live = [t.detach() for t in live]
        self._groups: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], list[Tensor]]] = {}
        self._copies: list[tuple[Tensor, Tensor]] = []
        for avg, cur, is_avg in zip(self.average, self.live, averaged, strict=True):
            if avg.shape != cur.shape:
                raise ValueError(f"Shapes differ: average {tuple(avg.shape)}, live {tuple(cur.shape)}.")
            if is_avg and (avg.is_floating_point() or avg.is_complex()):
                avgs, curs = self._groups.setdefault((avg.device, avg.dtype), ([], []))
                avgs.append(avg)
                curs.append(cur)
            else:
                self._copies.append((avg, cur))

    @torch.no_grad()
    def update(self, decay: float) -> None:
        """``average = decay * average + (1 - decay) * live`` for averaged tensors; copy the rest."""
        weight = 1.0 - decay
        for (device, dtype), (avgs, curs) in self._groups.items():
            if curs[0].device != device or curs[0].dtype != dtype:
                curs = [c.to(device=device, dtype=dtype) for c in curs]
            if weight == 1.0:
                torch._foreach_copy_(avgs, curs)
            else:
                torch._foreach_lerp_(avgs, curs, weight)
        for avg, cur in self._copies:
            avg.copy_(cur)

    @torch.no_grad()
    def pull_live(self, weight: float) -> None:
        """``live += weight * (average - live)`` for averaged tensors (``weight=1`` copies the average)."""
        for (device, dtype), (avgs, curs) in self._groups.items():
            if curs[0].device != device or curs[0].dtype != dtype:
                avgs = [a.to(device=c.device, dtype=c.dtype) for a, c in zip(avgs, curs, strict=True)]
            if weight == 1.0:
                torch._foreach_copy_(curs, avgs)
            else:
                torch._foreach_lerp_(curs, avgs, weight)

    @torch.no_grad()
    def copy_live_to_average(self) -> None:
        """Overwrite every average tensor with the live one."""
        self.update(decay=0.0)

    @torch.no_grad()
    def copy_average_to_live(self) -> None:
        """Overwrite every live tensor with the average one."""
        for avg, cur in zip(self.average, self.live, strict=True):
            cur.copy_(avg)

    @contextmanager
    def average_in_live(self) -> Iterator[None]:
        """Context manager with the average copied into the live tensors, restored bit-identically.

        The live values are backed up on the average's device (so an average kept on the CPU also
        keeps the backup off the accelerator) and the average itself is never written, so it keeps
        full precision when the live tensors have a lower-precision dtype.
        """
        with torch.no_grad():
            backups = [
                cur.to(device=avg.device, copy=True) for avg, cur in zip(self.average, self.live, strict=True)
            ]
            try:
                for avg, cur in zip(self.average, self.live, strict=True):
                    cur.copy_(avg)
                yield
            finally:
                for cur, backup in zip(self.live, backups, strict=True):
                    cur.copy_(backup)
