"""Learning-rate schedules with optional linear warm-up, returned as Lightning scheduler configs.

Every schedule is a ``torch.optim.lr_scheduler`` class except ``inverse_time`` (a ``LambdaLR``), SGDR with
peak decay or cooldown (:class:`CosineRestarts`), Huang et al.'s snapshot schedule (:class:`SnapshotCosine`,
a ``CosineAnnealingWarmRestarts``) and the warm-up composition (:class:`LinearWarmup`). Time is counted in
``interval`` units (epochs or optimizer steps).

Warm-up convention. With ``warmup=W``, schedules *shaped over the run* (cosine, restarts, snapshot,
exponential, inverse_time, cyclic, one_cycle, plateau) are shifted to start at ``t=W`` (timm's
``warmup_prefix=True``), so e.g. warm-up + cosine is

* ``lr(t) = base * (f + (1 - f) * t / W)`` for ``t < W``,
* ``lr(t) = eta_min + (base - eta_min) * (1 + cos(pi * (t - W) / (T - W))) / 2`` afterwards.

Step-decay *milestones* (``step_size`` of ``step``, ``milestones`` of ``multistep``) count from the start of
training, warm-up included, as the papers state them (He et al. 2016 and Goyal et al. 2017 decay at fixed
iterations/epochs of the whole run): ``milestones: [82, 123]`` decays at t=82 and t=123 whatever the
warm-up, and every milestone must lie after the warm-up.

Schedules with restarts report where their cycles end (``cycle_ends``, read through
:func:`scheduler_cycle_ends`), so :class:`lightning_tricks.callbacks.snapshot.SnapshotEnsemble` can take its
snapshots at the true restarts, warm-up included.

Example::

    from lightning_tricks.recipes.schedules import SchedulerConfig, build_scheduler

    config = SchedulerConfig(name="cosine", interval="step", warmup=500)
    lr_scheduler = build_scheduler(optimizer, config, total_steps=10_000, steps_per_epoch=100)
    # in configure_optimizers: return {"optimizer": optimizer, "lr_scheduler": lr_scheduler}
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch.optim import Optimizer
from torch.optim import lr_scheduler as lrs

from lightning_tricks.recipes._validation import (
    check_schedule_fits_run,
    check_scheduler_kwargs,
    check_training_steps,
)

SCHEDULER_NAMES: tuple[str, ...] = (
    "constant",
    "step",
    "multistep",
    "exponential",
    "inverse_time",
    "cosine",
    "cosine_restarts",
    "snapshot",
    "cyclic",
    "one_cycle",
    "plateau",
)
INTERVALS: tuple[str, ...] = ("epoch", "step")

_TORCH_CLASSES: dict[str, type] = {
    "step": lrs.StepLR,
    "multistep": lrs.MultiStepLR,
    "cosine": lrs.CosineAnnealingLR,
    "cosine_restarts": lrs.CosineAnnealingWarmRestarts,
    "cyclic": lrs.CyclicLR,
    "one_cycle": lrs.OneCycleLR,
    "plateau": lrs.ReduceLROnPlateau,
}
# Schedules without a torch class of their own accept only these ``SchedulerConfig.kwargs``.
_EXTRA_KWARGS: dict[str, set[str]] = {
    "exponential": {"decay_rate", "gamma"},
    "inverse_time": {"decay_rate"},
    "snapshot": {"cycles", "eta_min"},
}
# Options beyond the torch class's own arguments (timm's SGDR options); they select CosineRestarts.
_ADDED_KWARGS: dict[str, set[str]] = {"cosine_restarts": {"cycle_decay", "cooldown"}}
_REQUIRED_KWARGS: dict[str, tuple[str, ...]] = {
    "step": ("step_size",),
    "multistep": ("milestones",),
    "inverse_time": ("decay_rate",),
    "cosine_restarts": ("T_0",),
    "snapshot": ("cycles",),
}
# Set by build_scheduler itself (from the optimizer or the run length), never by the user.
_RESERVED_KWARGS = {"optimizer", "last_epoch", "epochs", "steps_per_epoch", "verbose"}


def _allowed_kwargs(name: str) -> set[str]:
    if name in _EXTRA_KWARGS:
        return _EXTRA_KWARGS[name]
    if name == "constant":
        return set()
    own = set(inspect.signature(_TORCH_CLASSES[name]).parameters) - _RESERVED_KWARGS
    return own | _ADDED_KWARGS.get(name, set())


@dataclass(frozen=True)
class SchedulerConfig:
    """Which learning-rate schedule to use, stepped per epoch or per optimizer step.

    Args:
        name: ``None``/``"constant"``, ``step``, ``multistep``, ``exponential`` (``eta0 * exp(-k t)``),
            ``inverse_time`` (``eta0 / (1 + k t)``), ``cosine``, ``cosine_restarts``, ``cyclic``,
            ``one_cycle`` or ``plateau``.
        interval: ``"epoch"`` or ``"step"``: the unit in which the scheduler is stepped and in which
            its time parameters (``step_size``, ``T_max``, ``warmup``, ...) are counted.
        warmup: Linear warm-up length in ``interval`` units; composes with every schedule.
        warmup_start_factor: The lr at ``t=0`` is this fraction of the schedule's lr at ``t=warmup``.
        monitor: Logged metric that ``plateau`` watches.
        kwargs: Schedule-specific arguments: ``step_size``/``gamma`` (step), ``milestones``/``gamma``
            (multistep), ``decay_rate`` ``k`` (exponential, inverse_time), ``T_max``/``eta_min`` (cosine;
            default ``T_max`` = the run minus warm-up), ``T_0``/``T_mult``/``eta_min`` (cosine_restarts,
            plus timm's SGDR options ``cycle_decay`` (peak lr factor per restart, in ``(0, 1]``) and
            ``cooldown`` (``interval`` units at ``eta_min`` at the end; only cycles that end before it
            run)), ``cycles``/``eta_min`` (snapshot: Huang et al.'s ``M`` cycles of
            ``ceil(T / M)`` over the run after warm-up),
            ``base_lr``/``max_lr``/``step_size_up``/``mode`` (cyclic; defaults ``max_lr`` = optimizer lr,
            ``base_lr`` = ``max_lr / 10``, ``step_size_up`` = 4 epochs), ``max_lr``/``pct_start`` (one_cycle;
            defaults: optimizer lr, the run minus warm-up), ``mode``/``factor``/``patience`` (plateau).
            Other keyword arguments of the torch class are passed through.

    Example::

        SchedulerConfig(name="multistep", kwargs={"milestones": [100, 150], "gamma": 0.1})
    """

    name: str | None = None
    interval: str = "epoch"
    warmup: int = 0
    warmup_start_factor: float = 0.01
    monitor: str = "val/loss"
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        name = self.resolved_name
        if name not in SCHEDULER_NAMES:
            raise ValueError(
                f"scheduler.name={self.name!r} is unknown; valid names: {', '.join(SCHEDULER_NAMES)} "
                "(null or none also mean constant)"
            )
        if self.interval not in INTERVALS:
            raise ValueError(f"scheduler.interval must be 'epoch' or 'step', got {self.interval!r}")
        if isinstance(self.warmup, bool) or not isinstance(self.warmup, int) or self.warmup < 0:
            raise ValueError(f"scheduler.warmup must be an integer >= 0, got {self.warmup!r}; use 0 for none")
        if not 0 < self.warmup_start_factor <= 1:
            raise ValueError(
                f"scheduler.warmup_start_factor must be in (0, 1], got {self.warmup_start_factor}; e.g. 0.01"
            )
        unknown = set(self.kwargs) - _allowed_kwargs(name)
        if unknown:
            raise ValueError(
                f"scheduler.kwargs has {sorted(unknown)} which {name!r} does not accept; "
                f"valid: {sorted(_allowed_kwargs(name))}"
            )
        missing = [k for k in _REQUIRED_KWARGS.get(name, ()) if k not in self.kwargs]
        if missing:
            raise ValueError(f"scheduler.kwargs.{missing[0]} is required for scheduler.name={name!r}")
        if name == "exponential" and ("decay_rate" in self.kwargs) == ("gamma" in self.kwargs):
            raise ValueError(
                "scheduler.kwargs needs exactly one of decay_rate (lr = eta0 * exp(-k t)) or gamma "
                "for 'exponential'"
            )
        rate = self.kwargs.get("decay_rate", 0.0)
        if not rate >= 0:
            raise ValueError(f"scheduler.kwargs.decay_rate must be >= 0, got {rate}")
        check_scheduler_kwargs(name, self.kwargs)

    @property
    def resolved_name(self) -> str:
        """``name`` with ``None`` (also spelled ``"none"``/``"null"`` on a command line) mapped to
        ``"constant"``."""
        if self.name is None or self.name.lower() in ("none", "null"):
            return "constant"
        return self.name


class InverseTimeDecay:
    """``LambdaLR`` factor ``1 / (1 + k t)``; a class (not a lambda) so ``LambdaLR.state_dict`` keeps it.

    Example::

        torch.optim.lr_scheduler.LambdaLR(optimizer, InverseTimeDecay(0.1))
    """

    def __init__(self, decay_rate: float) -> None:
        self.decay_rate = decay_rate

    def __call__(self, t: int) -> float:
        return 1.0 / (1.0 + self.decay_rate * t)


class LinearWarmup(lrs.LRScheduler):
    """Linear warm-up for ``warmup`` steps, then the wrapped scheduler, shifted to start at ``t=warmup``.

    ``lr(t) = target * (f + (1 - f) * t / warmup)`` for ``t < warmup``, where ``target`` (``base_lrs``) is
    the lr the wrapped scheduler set when it was built (its value at its own ``t=0``); afterwards each
    ``step`` is forwarded to the wrapped scheduler. Metrics passed to ``step`` during warm-up are ignored,
    so a wrapped ``ReduceLROnPlateau`` only sees epochs trained at the full lr. Hand-written because
    ``SequentialLR`` rejects ``ReduceLROnPlateau`` and resets schedulers that set the lr when built
    (``CyclicLR``, ``OneCycleLR``).

    Args:
        optimizer: The optimizer ``scheduler`` drives.
        scheduler: The main schedule, freshly built (not yet stepped).
        warmup: Warm-up length in steps of this scheduler, ``>= 1``.
        start_factor: Fraction of the target lr at ``t=0``, in ``(0, 1]``.

    Example::

        main = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=90)
        scheduler = LinearWarmup(optimizer, main, warmup=10, start_factor=0.01)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        scheduler: lrs.LRScheduler | lrs.ReduceLROnPlateau,
        warmup: int,
        start_factor: float = 0.01,
    ) -> None:
        if warmup < 1:
            raise ValueError(f"LinearWarmup needs warmup >= 1, got {warmup}")
        if not 0 < start_factor <= 1:
            raise ValueError(f"LinearWarmup needs start_factor in (0, 1], got {start_factor}")
        if scheduler.optimizer is not optimizer:
            raise ValueError("LinearWarmup: the wrapped scheduler drives a different optimizer")
        # No super().__init__(): the base class would step a get_lr() this wrapper does not have.
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.warmup = warmup
        self.start_factor = start_factor
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.last_epoch = 0
        self._step_count = 1
        self._set_lrs(self._warmup_lrs(0))

    def _warmup_lrs(self, t: int) -> list[float]:
        factor = self.start_factor + (1.0 - self.start_factor) * min(t, self.warmup) / self.warmup
        return [lr * factor for lr in self.base_lrs]

    def _set_lrs(self, lrs_: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs_, strict=True):
            group["lr"] = lr
        self._last_lr = list(lrs_)

    def step(self, metrics: Any = None) -> None:  # type: ignore[override]
        """Advance one ``interval`` unit; ``metrics`` is forwarded to a wrapped ``ReduceLROnPlateau``."""
        self.last_epoch += 1
        self._step_count += 1
        if self.last_epoch <= self.warmup:
            self._set_lrs(self._warmup_lrs(self.last_epoch))
            return
        if isinstance(self.scheduler, lrs.ReduceLROnPlateau):
            if metrics is None:
                raise ValueError(
                    "LinearWarmup wraps ReduceLROnPlateau: step(metrics) needs the monitored value"
                )
            self.scheduler.step(metrics)
        else:
            self.scheduler.step()
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    @property
    def _schedulers(self) -> list[Any]:
        """The wrapped scheduler, where torch's composite schedulers keep theirs, so code that rescales every
        lr of a schedule (LR finder, optimizer switch, the linear scaling rule) reaches it too."""
        return [self.scheduler]

    def cycle_ends(self, limit: int) -> list[int] | None:
        """The wrapped scheduler's cycle ends shifted by the warm-up (see :func:`scheduler_cycle_ends`)."""
        inner = scheduler_cycle_ends(self.scheduler, limit - self.warmup)
        return None if inner is None else [self.warmup + end for end in inner]

    def state_dict(self) -> dict[str, Any]:
        """Wrapper state plus the wrapped scheduler's ``state_dict`` under ``"scheduler"``."""
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "scheduler")}
        state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state produced by :meth:`state_dict`."""
        state = dict(state_dict)
        self.scheduler.load_state_dict(state.pop("scheduler"))
        self.__dict__.update(state)


class CosineRestarts(lrs.LRScheduler):
    """SGDR (Loshchilov & Hutter, 2017) with timm's options: peak decay per restart and a cycle limit.

    Cycle ``i`` (from 0) lasts ``T_i = T_0 * T_mult**i`` steps and runs
    ``lr = eta_min + (base * cycle_decay**i - eta_min) * (1 + cos(pi * t_cur / T_i)) / 2``; after
    ``cycle_limit`` cycles the lr stays at ``eta_min`` (the cooldown). Same values as timm's
    ``CosineLRScheduler(t_initial=T_0, cycle_mul=T_mult, cycle_decay, lr_min=eta_min, cycle_limit)``.
    Hand-written because torch's ``CosineAnnealingWarmRestarts`` has neither peak decay nor a cycle limit,
    and timm's scheduler is not a torch ``LRScheduler`` (Lightning would need a custom
    ``lr_scheduler_step`` in every module).

    Args:
        optimizer: The optimizer whose param-group lrs are scheduled.
        T_0: Length of the first cycle, ``>= 1``.
        T_mult: Cycle length multiplier, ``>= 1`` (may be fractional here, as timm's ``cycle_mul``; the
            recipe's ``scheduler.kwargs.T_mult`` is an integer, as torch's).
        eta_min: Lowest lr, ``>= 0``.
        cycle_decay: Peak lr factor per restart, in ``(0, 1]``.
        cycle_limit: Number of cycles before the cooldown at ``eta_min``; ``None`` for no limit.

    Example::

        scheduler = CosineRestarts(optimizer, T_0=10, T_mult=2, cycle_decay=0.5)
    """

    def __init__(
        self,
        optimizer: Optimizer,
        T_0: int,
        T_mult: float = 1,
        eta_min: float = 0.0,
        cycle_decay: float = 1.0,
        cycle_limit: int | None = None,
        last_epoch: int = -1,
    ) -> None:
        if isinstance(T_0, bool) or not isinstance(T_0, int) or T_0 < 1:
            raise ValueError(f"scheduler.kwargs.T_0 must be an integer >= 1, got {T_0!r}")
        if not T_mult >= 1:
            raise ValueError(f"scheduler.kwargs.T_mult must be >= 1, got {T_mult!r}")
        if not eta_min >= 0:
            raise ValueError(f"scheduler.kwargs.eta_min must be >= 0, got {eta_min!r}")
        if not 0 < cycle_decay <= 1:
            raise ValueError(f"scheduler.kwargs.cycle_decay must be in (0, 1], got {cycle_decay!r}")
        if cycle_limit is not None and cycle_limit < 1:
            raise ValueError(f"CosineRestarts cycle_limit must be >= 1 or None, got {cycle_limit!r}")
        self.T_0, self.T_mult, self.eta_min = T_0, float(T_mult), float(eta_min)
        self.cycle_decay, self.cycle_limit = float(cycle_decay), cycle_limit
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The closed-form lr at ``t = last_epoch``."""
        t = self.last_epoch
        i, start, length = next(c for c in _sgdr_cycles(self.T_0, self.T_mult) if t < c[1] + c[2])
        if self.cycle_limit is not None and i >= self.cycle_limit:
            return [self.eta_min for _ in self.base_lrs]
        cosine = (1 + math.cos(math.pi * (t - start) / length)) / 2
        return [self.eta_min + (base * self.cycle_decay**i - self.eta_min) * cosine for base in self.base_lrs]

    def cycle_ends(self, limit: int) -> list[int]:
        """Steps after which a cycle ends (the lr restarts, or the cooldown starts), up to ``limit``."""
        return _sgdr_cycle_ends(self.T_0, self.T_mult, limit, self.cycle_limit)


def _sgdr_cycles(T_0: int, T_mult: float) -> Iterator[tuple[int, float, float]]:
    """``(i, start, length)`` of each SGDR cycle, forever."""
    i, start, length = 0, 0.0, float(T_0)
    while True:
        yield i, start, length
        i, start, length = i + 1, start + length, length * T_mult


def _sgdr_cycle_ends(T_0: int, T_mult: float, limit: int, cycle_limit: int | None = None) -> list[int]:
    ends = []
    for i, start, length in _sgdr_cycles(T_0, T_mult):
        end = math.ceil(start + length)  # the first step at which the next cycle's lr is in force
        if end > limit or (cycle_limit is not None and i >= cycle_limit):
            return ends
        ends.append(end)
    raise AssertionError("unreachable")  # pragma: no cover


class SnapshotCosine(lrs.CosineAnnealingWarmRestarts):
    """Huang et al.'s (2017) snapshot-ensemble schedule: ``M`` cosine cycles over ``T`` steps.

    ``a(t) = a0 / 2 * (cos(pi * mod(t - 1, ceil(T / M)) / ceil(T / M)) + 1)`` for the ``t``-th step (1-based),
    which is torch's ``CosineAnnealingWarmRestarts(T_0=ceil(T / M))``; the last cycle is cut at ``T``.
    Pair it with :class:`~lightning_tricks.callbacks.snapshot.SnapshotEnsemble`, which reads
    :meth:`cycle_ends` and snapshots at each.

    Args:
        optimizer: The optimizer; its lr is the restart lr ``a0``.
        total_steps: ``T``, steps of this scheduler in the run.
        cycles: ``M``, ``1 <= M`` and every cycle non-empty.
        eta_min: Lowest lr (the paper: 0).

    Raises:
        ValueError: When ``M`` cycles of ``ceil(T / M)`` steps do not fit in ``T`` (the last would be empty).

    Example::

        scheduler = SnapshotCosine(optimizer, total_steps=300 * 391, cycles=6)
    """

    def __init__(
        self, optimizer: Optimizer, total_steps: int, cycles: int, eta_min: float = 0.0, last_epoch: int = -1
    ) -> None:
        length = math.ceil(total_steps / cycles)
        if cycles > total_steps or (cycles - 1) * length >= total_steps:
            raise ValueError(
                f"scheduler.kwargs.cycles={cycles} does not fit in {total_steps} scheduler steps: cycles of "
                f"ceil({total_steps}/{cycles})={length} steps leave the last cycle empty. Use fewer cycles "
                "or a longer run (max_epochs / max_steps)"
            )
        if cycles * length != total_steps:
            warnings.warn(
                f"snapshot schedule: {total_steps} scheduler steps are not a multiple of the cycle length "
                f"{length}, so the last cycle is cut short and its snapshot is taken before its lr reaches "
                "the minimum. Choose a run length divisible by `cycles` to avoid this.",
                UserWarning,
                stacklevel=2,
            )
        self.total_steps, self.cycles = total_steps, cycles
        super().__init__(optimizer, T_0=length, eta_min=eta_min, last_epoch=last_epoch)

    def cycle_ends(self, limit: int) -> list[int]:
        """Steps ending each of the ``M`` cycles (the last at ``T``), up to ``limit``."""
        ends = [min(i * self.T_0, self.total_steps) for i in range(1, self.cycles + 1)]
        return [e for e in ends if e <= limit]


# Schedules that never restart (OneCycleLR's single cycle ends with the run, not with a restart).
_ONE_SHOT = (
    lrs.StepLR,
    lrs.MultiStepLR,
    lrs.ExponentialLR,
    lrs.ConstantLR,
    lrs.LinearLR,
    lrs.PolynomialLR,
    lrs.OneCycleLR,
    lrs.ReduceLROnPlateau,
)


def scheduler_cycle_ends(scheduler: Any, limit: int) -> list[int] | None:
    """Scheduler steps after which ``scheduler``'s cycles end, up to ``limit``; ``None`` if it cannot tell.

    Knows torch's ``CosineAnnealingWarmRestarts``, the schedules that never restart (step decays, exponential,
    one-cycle, plateau: ``[]``) and every scheduler with a ``cycle_ends(limit)`` method
    (:class:`CosineRestarts`, :class:`SnapshotCosine`, :class:`LinearWarmup` around one of them).

    Example::

        scheduler_cycle_ends(CosineAnnealingWarmRestarts(optimizer, T_0=4, T_mult=2), 24)  # [4, 12]
    """
    if hasattr(scheduler, "cycle_ends"):
        return scheduler.cycle_ends(limit)
    if isinstance(scheduler, _ONE_SHOT):
        return []  # no cycle ends: the lr never restarts
    if isinstance(scheduler, lrs.CosineAnnealingWarmRestarts):
        ends, end, length = [], scheduler.T_0, scheduler.T_0
        while end <= limit:
            ends.append(end)
            length *= scheduler.T_mult
            end += length
        return ends
    return None


def _momentum_present(optimizer: Optimizer) -> bool:
    defaults = optimizer.defaults
    return defaults.get("momentum", 0) > 0 or "betas" in defaults


def _build_main(
    optimizer: Optimizer, name: str, kwargs: dict[str, Any], run_length: int, steps_per_unit: int
) -> lrs.LRScheduler | lrs.ReduceLROnPlateau | None:
    kw = dict(kwargs)
    if name == "constant":
        return None
    if name == "exponential":
        gamma = kw.pop("gamma") if "gamma" in kw else math.exp(-kw.pop("decay_rate"))
        return lrs.ExponentialLR(optimizer, gamma=gamma)
    if name == "inverse_time":
        return lrs.LambdaLR(optimizer, InverseTimeDecay(kw.pop("decay_rate")))
    if name == "snapshot":
        return SnapshotCosine(optimizer, run_length, kw.pop("cycles"), **kw)
    fractional_mult = not float(kw.get("T_mult", 1)).is_integer()
    if name == "cosine_restarts" and ("cycle_decay" in kw or "cooldown" in kw or fractional_mult):
        # torch's CosineAnnealingWarmRestarts has no peak decay or cooldown and needs an integer T_mult
        return _sgdr(optimizer, kw, run_length)
    if name == "cosine":
        kw.setdefault("T_max", run_length)
    elif name == "cyclic":
        kw.setdefault("max_lr", [g["lr"] for g in optimizer.param_groups])
        kw.setdefault("base_lr", [lr / 10 for lr in _as_list(kw["max_lr"], optimizer)])
        # Smith (2017) recommends half-cycles of 2-10 epochs.
        kw.setdefault("step_size_up", 4 * steps_per_unit)
        kw.setdefault("cycle_momentum", _momentum_present(optimizer))
    elif name == "one_cycle":
        kw.setdefault("max_lr", [g["lr"] for g in optimizer.param_groups])
        kw.setdefault("total_steps", run_length)
        kw.setdefault("cycle_momentum", _momentum_present(optimizer))
    return _TORCH_CLASSES[name](optimizer, **kw)


def _sgdr(optimizer: Optimizer, kwargs: dict[str, Any], run_length: int) -> CosineRestarts:
    """``CosineRestarts`` whose cycles all end before the last ``cooldown`` units of the run."""
    kw = dict(kwargs)
    cooldown = kw.pop("cooldown", 0)
    if cooldown:
        fitting = len(_sgdr_cycle_ends(kw["T_0"], kw.get("T_mult", 1), run_length - cooldown))
        if fitting == 0:
            raise ValueError(
                f"scheduler.kwargs.cooldown={cooldown} leaves {run_length - cooldown} units, less than one "
                f"cycle (T_0={kw['T_0']}); shorten the cooldown or T_0"
            )
        kw["cycle_limit"] = fitting
    return CosineRestarts(optimizer, **kw)


def _absolute_milestones(name: str, kwargs: dict[str, Any], warmup: int, run_length: int) -> tuple[str, dict]:
    """Step decay with warm-up: milestones count from the start of training, so the shifted main
    schedule gets them minus ``warmup`` (``step`` becomes the equivalent ``multistep``)."""
    if warmup == 0 or name not in ("step", "multistep"):
        return name, kwargs
    kw = dict(kwargs)
    if name == "step":
        size = kw.pop("step_size")
        milestones = list(range(size, run_length, size))
    else:
        milestones = list(kw.pop("milestones"))
    early = [m for m in milestones if m <= warmup]
    if early:
        key = "step_size" if name == "step" else "milestones"
        raise ValueError(
            f"scheduler.kwargs.{key} puts a decay at {early}, inside the warm-up "
            f"(scheduler.warmup={warmup}); milestones count from the start of training, warm-up "
            "included, so each must be > warmup"
        )
    kw["milestones"] = [m - warmup for m in milestones]
    return "multistep", kw


def _as_list(value: float | list[float], optimizer: Optimizer) -> list[float]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * len(optimizer.param_groups)


def schedule_length(config: SchedulerConfig, total_steps: int, steps_per_epoch: int) -> int:
    """The run's length in the schedule's ``interval`` units, warm-up included (what it is fitted to)."""
    return max(1, total_steps // steps_per_epoch) if config.interval == "epoch" else total_steps


def fitted_to_run_length(config: SchedulerConfig) -> bool:
    """Whether the schedule's shape is computed from the run's length (it cannot be extended later):
    one_cycle and cosine without an explicit ``total_steps``/``T_max``, snapshot, SGDR with cooldown."""
    name, kwargs = config.resolved_name, config.kwargs
    return (
        (name == "one_cycle" and "total_steps" not in kwargs)
        or (name == "cosine" and "T_max" not in kwargs)
        or name == "snapshot"
        or (name == "cosine_restarts" and bool(kwargs.get("cooldown")))
    )


def check_resumed_length(config: SchedulerConfig, saved: int, length: int, steps_per_epoch: int) -> None:
    """Refuse to resume a schedule fitted to a ``saved``-unit run into a longer run of ``length`` units.

    The checkpoint's scheduler state replaces the one built for the new length, so the old shape would
    run past its end (one_cycle fails deep inside torch, cosine climbs back up).

    Example::

        check_resumed_length(SchedulerConfig("one_cycle", interval="step"), 40, 80, 20)  # ValueError
    """
    if length <= saved or not fitted_to_run_length(config):
        return
    unit = "epochs" if config.interval == "epoch" else "optimizer steps"
    if config.interval == "epoch":
        keep = f"trainer.max_epochs={saved}"
    elif saved % steps_per_epoch == 0:
        keep = f"trainer.max_epochs={saved // steps_per_epoch}"
    else:
        keep = f"trainer.max_steps={saved}"
    raise ValueError(
        f"scheduler.name={config.resolved_name!r} is fitted to the checkpoint's run of {saved} {unit}, "
        f"but the resumed run lasts {length} {unit}: the restored schedule cannot be stretched and would "
        "run past its end. Train longer in a new run (no ckpt_path) or with a schedule that can continue "
        "(constant, step, multistep, exponential, inverse_time, cosine_restarts, cyclic, plateau), or "
        f"resume with the checkpoint's length, e.g. {keep}"
    )


def build_scheduler(
    optimizer: Optimizer, config: SchedulerConfig, total_steps: int, steps_per_epoch: int
) -> dict[str, Any] | None:
    """Build the Lightning ``lr_scheduler`` config for ``optimizer``.

    Args:
        optimizer: The optimizer whose param-group lrs are scheduled (their current lr is the base lr).
        config: Scheduler configuration.
        total_steps: Optimizer steps in the whole run (``trainer.estimated_stepping_batches``).
        steps_per_epoch: Optimizer steps per epoch; with ``interval="epoch"`` the run lasts
            ``total_steps // steps_per_epoch`` epochs.

    Returns:
        ``{"scheduler", "interval", "frequency": 1}`` (plus ``"monitor"`` and ``"reduce_on_plateau"`` for
        ``plateau``), or ``None`` for a constant lr without warm-up.

    Example::

        def configure_optimizers(self):
            optimizer = build_optimizer(self, OptimizerConfig())
            total = self.trainer.estimated_stepping_batches
            sched = build_scheduler(optimizer, SchedulerConfig("cosine", warmup=5), total, total // 100)
            return {"optimizer": optimizer, "lr_scheduler": sched} if sched else optimizer
    """
    check_training_steps(total_steps, steps_per_epoch)
    name = config.resolved_name
    if name == "constant" and config.warmup == 0:
        return None
    per_epoch = config.interval == "epoch"
    run_length = schedule_length(config, total_steps, steps_per_epoch)
    if name != "constant" and config.warmup >= run_length:
        raise ValueError(
            f"scheduler.warmup={config.warmup} must be shorter than the run ({run_length} {config.interval}s)"
        )
    if name != "constant":
        check_schedule_fits_run(name, config.kwargs, run_length - config.warmup, config.interval)
    if name == "constant":
        scheduler: Any = lrs.LinearLR(
            optimizer, start_factor=config.warmup_start_factor, end_factor=1.0, total_iters=config.warmup
        )
    else:
        steps_per_unit = 1 if per_epoch else steps_per_epoch
        main_name, kwargs = _absolute_milestones(name, config.kwargs, config.warmup, run_length)
        scheduler = _build_main(optimizer, main_name, kwargs, run_length - config.warmup, steps_per_unit)
        if config.warmup > 0:
            scheduler = LinearWarmup(optimizer, scheduler, config.warmup, config.warmup_start_factor)
    out: dict[str, Any] = {"scheduler": scheduler, "interval": config.interval, "frequency": 1}
    if name == "plateau":
        out["monitor"] = config.monitor
        out["reduce_on_plateau"] = True
    return out
