"""Range checks of the numeric keyword arguments the recipe hands to ``torch.optim``.

torch accepts many values that silently ruin a run (``ExponentialLR(gamma=-1)`` flips the sign of the
learning rate; ``StepLR(step_size=0)`` dies with ``ZeroDivisionError`` after the first epoch), so every
value of ``scheduler.kwargs`` and ``optimizer.kwargs`` is checked here when the config is built, and the
schedule's time arguments again against the run's length in :func:`check_schedule_fits_run`. Each error
names the config key, the value, the allowed range and an example.

Example::

    check_scheduler_kwargs("step", {"step_size": 0})
    # ValueError: scheduler.kwargs.step_size must be an integer >= 1, got 0;
    #             e.g. scheduler.kwargs.step_size=30
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn


@dataclass(frozen=True)
class Rule:
    """What a keyword argument accepts: ``check(value)``, said as ``allowed``, with an ``example``."""

    check: Callable[[Any], bool]
    allowed: str
    example: str


def _number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _numbers(check: Callable[[float], bool]) -> Callable[[Any], bool]:
    """A number, or a non-empty list of numbers (one per parameter group), each passing ``check``."""

    def accepts(value: Any) -> bool:
        values = value if isinstance(value, (list, tuple)) else [value]
        return bool(values) and all(_number(v) and check(v) for v in values)

    return accepts


POSITIVE = Rule(_numbers(lambda v: v > 0), "a number > 0", "0.1")
NON_NEGATIVE = Rule(_numbers(lambda v: v >= 0), "a number >= 0", "0.0")
FRACTION_OPEN = Rule(_numbers(lambda v: 0 < v < 1), "a number in (0, 1)", "0.1")
MOMENTUM = Rule(_numbers(lambda v: 0 <= v < 1), "a number in [0, 1)", "0.9")
UNIT_CLOSED = Rule(_numbers(lambda v: 0 <= v <= 1), "a number in [0, 1]", "0.0")
COUNT = Rule(lambda v: _integer(v) and v >= 1, "an integer >= 1", "10")
COUNT_OR_ZERO = Rule(lambda v: _integer(v) and v >= 0, "an integer >= 0", "0")
FLAG = Rule(lambda v: isinstance(v, bool), "true or false", "false")


def _choice(*options: str) -> Rule:
    return Rule(lambda v: v in options, f"one of {', '.join(map(repr, options))}", options[0])


def _milestones(value: Any) -> bool:
    return (
        isinstance(value, (list, tuple))
        and bool(value)
        and all(_integer(v) and v >= 1 for v in value)
        and list(value) == sorted(set(value))
    )


MILESTONES = Rule(_milestones, "a non-empty increasing list of integers >= 1", "[30, 60, 90]")

# Keyword arguments shared by several schedules, then the ones whose meaning depends on the schedule.
_SCHEDULER_RULES: dict[str, Rule] = {
    "gamma": Rule(POSITIVE.check, "a number > 0 (the lr is multiplied by it)", "0.1"),
    "step_size": Rule(COUNT.check, COUNT.allowed, "30"),
    "milestones": MILESTONES,
    "decay_rate": NON_NEGATIVE,
    "T_max": Rule(COUNT.check, COUNT.allowed, "100"),
    "T_0": Rule(COUNT.check, COUNT.allowed, "10"),
    "T_mult": Rule(_numbers(lambda v: v >= 1), "a number >= 1 (cycle length multiplier)", "2"),
    "cycles": COUNT,
    "cycle_decay": Rule(_numbers(lambda v: 0 < v <= 1), "a number in (0, 1]; 1 keeps every peak", "1.0"),
    "eta_min": NON_NEGATIVE,
    "base_lr": POSITIVE,
    "max_lr": POSITIVE,
    "step_size_up": Rule(COUNT.check, COUNT.allowed, "2000"),
    "step_size_down": Rule(lambda v: v is None or COUNT.check(v), "null or an integer >= 1", "2000"),
    "scale_mode": _choice("cycle", "iterations"),
    "cycle_momentum": FLAG,
    "base_momentum": MOMENTUM,
    "max_momentum": MOMENTUM,
    "total_steps": COUNT,
    "pct_start": Rule(FRACTION_OPEN.check, FRACTION_OPEN.allowed, "0.3"),
    "anneal_strategy": _choice("cos", "linear"),
    "div_factor": Rule(POSITIVE.check, POSITIVE.allowed, "25.0"),
    "final_div_factor": Rule(POSITIVE.check, POSITIVE.allowed, "10000.0"),
    "three_phase": FLAG,
    "factor": FRACTION_OPEN,
    "patience": COUNT_OR_ZERO,
    "threshold": Rule(NON_NEGATIVE.check, NON_NEGATIVE.allowed, "0.0001"),
    "threshold_mode": _choice("rel", "abs"),
    "cooldown": COUNT_OR_ZERO,
    "min_lr": NON_NEGATIVE,
    "eps": Rule(NON_NEGATIVE.check, NON_NEGATIVE.allowed, "1e-08"),
}
_SCHEDULER_RULES_BY_NAME: dict[tuple[str, str], Rule] = {
    ("cyclic", "mode"): _choice("triangular", "triangular2", "exp_range"),
    ("cyclic", "gamma"): Rule(lambda v: _number(v) and 0 < v <= 1, "a number in (0, 1]", "0.99994"),
    ("plateau", "mode"): _choice("min", "max"),
}

_OPTIMIZER_RULES: dict[str, Rule] = {
    "lr": POSITIVE,
    "momentum": MOMENTUM,
    "dampening": UNIT_CLOSED,
    "weight_decay": NON_NEGATIVE,
    "eps": Rule(POSITIVE.check, POSITIVE.allowed, "1e-08"),
    "alpha": Rule(MOMENTUM.check, MOMENTUM.allowed, "0.99"),
    "rho": Rule(MOMENTUM.check, MOMENTUM.allowed, "0.9"),
    "lr_decay": NON_NEGATIVE,
    "initial_accumulator_value": NON_NEGATIVE,
    "increase": Rule(NON_NEGATIVE.check, NON_NEGATIVE.allowed, "0.05"),
    "decrease": Rule(_numbers(lambda v: 0 < v <= 1), "a number in (0, 1]", "0.95"),
    "min_gain": Rule(_numbers(lambda v: 0 < v <= 1), "a number in (0, 1]", "0.01"),
    "max_gain": Rule(_numbers(lambda v: v >= 1), "a number >= 1", "100.0"),
    "nesterov": FLAG,
    "amsgrad": FLAG,
    "centered": FLAG,
    "maximize": FLAG,
    "foreach": Rule(lambda v: v is None or isinstance(v, bool), "null, true or false", "null"),
    # timm's LARS / LAMB
    "trust_coeff": Rule(POSITIVE.check, POSITIVE.allowed, "0.001"),
    "trust_clip": FLAG,
    "always_adapt": FLAG,
    "bias_correction": Rule(FLAG.check, FLAG.allowed, "true"),
    "grad_averaging": Rule(FLAG.check, FLAG.allowed, "true"),
    "max_grad_norm": Rule(lambda v: v is None or POSITIVE.check(v), "null or a number > 0", "1.0"),
    "caution": FLAG,
    "decoupled_decay": FLAG,
    "corrected_weight_decay": FLAG,
}

# Settings of the optimizer wrappers (optimizer.lookahead, optimizer.sam).
_WRAPPER_RULES: dict[str, dict[str, Rule]] = {
    "lookahead": {
        "k": Rule(COUNT.check, "an integer >= 1 (fast steps per slow update)", "5"),
        "alpha": Rule(_numbers(lambda v: 0 < v <= 1), "a number in (0, 1] (slow weights' step)", "0.5"),
    },
    "sam": {
        "rho": Rule(_numbers(lambda v: v > 0), "a number > 0 (neighbourhood radius)", "0.05"),
        "adaptive": FLAG,
    },
}


def _betas(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == 2 and all(MOMENTUM.check(v) for v in value)


_OPTIMIZER_RULES["betas"] = Rule(_betas, "two numbers in [0, 1)", "[0.9, 0.999]")


def _check(prefix: str, name: str, value: Any, rule: Rule | None) -> None:
    if rule is not None and not rule.check(value):
        raise ValueError(
            f"{prefix}.{name} must be {rule.allowed}, got {value!r}; e.g. {prefix}.{name}={rule.example}"
        )


def check_scheduler_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming ``scheduler.kwargs.<key>`` for a value torch would misuse."""
    for key, value in kwargs.items():
        rule = _SCHEDULER_RULES_BY_NAME.get((name, key), _SCHEDULER_RULES.get(key))
        _check("scheduler.kwargs", key, value, rule)


def check_schedule_fits_run(name: str, kwargs: dict[str, Any], run_length: int, interval: str) -> None:
    """Warn (rank 0) about a step or multistep schedule that would never change the lr within the run.

    A warning, not an error, so that a shortened run of a shipped config (a smoke test of a paper's
    recipe) stays runnable; the same choice as for switch epochs and snapshot cycles beyond the run.
    ``run_length`` is the schedule's length in ``interval`` units after warm-up.
    """
    unit = f"{interval}s"
    if name == "step" and kwargs["step_size"] >= run_length:
        rank_zero_warn(
            f"scheduler.kwargs.step_size={kwargs['step_size']} never triggers: the schedule lasts "
            f"{run_length} {unit} after warm-up; e.g. scheduler.kwargs.step_size={max(1, run_length // 3)}"
        )
    if name == "multistep" and min(kwargs["milestones"]) >= run_length:
        example = sorted({max(1, run_length // 2), max(1, 3 * run_length // 4)})
        rank_zero_warn(
            f"scheduler.kwargs.milestones={list(kwargs['milestones'])} never trigger: the schedule lasts "
            f"{run_length} {unit} after warm-up; e.g. scheduler.kwargs.milestones={example}"
        )


def _sized(obj: Any) -> int | None:
    try:
        return len(obj)
    except TypeError:
        return None


def _loader_shape(loader: Any) -> tuple[Any, int | None, bool]:
    """``(batch_size, samples, drop_last)`` of a training loader; ``samples`` is the sampler's length
    (this rank's share), else the dataset's, else ``None``."""
    size = _sized(getattr(loader, "sampler", None))
    size = _sized(getattr(loader, "dataset", None)) if size is None else size
    return getattr(loader, "batch_size", None), size, bool(getattr(loader, "drop_last", False))


def warn_batch_larger_than_data(loader: Any) -> None:
    """Warn when ``batch_size`` exceeds the training samples (``drop_last=False``): each epoch is then
    one smaller batch, and the batch size the run reports, and scales the lr by, never occurs.

    Example::

        warn_batch_larger_than_data(DataLoader(ten_samples, batch_size=64))
        # UserWarning: batch_size=64 is larger than the 10 training samples ...
    """
    batch_size, size, drop_last = _loader_shape(loader)
    # with drop_last there is no batch at all: check_training_steps' error
    if not isinstance(batch_size, int) or not size or size >= batch_size or drop_last:
        return
    rank_zero_warn(
        f"batch_size={batch_size} is larger than the {size} training samples (per process), so every epoch "
        f"is one batch of {size}: the run trains on a batch size it was not configured for (and the linear "
        f"scaling rule, if set, scales the lr for {batch_size}); e.g. data.init_args.batch_size={size}"
    )


def check_training_steps(total_steps: float, steps_per_epoch: float, loader: Any = None) -> None:
    """Raise ``ValueError`` when the run has no optimizer step: every zero-step budget ends here.

    ``loader`` is the training loader (a ``DataLoader`` or anything with ``batch_size``, ``drop_last``
    and a sized ``dataset`` or ``sampler``); when it explains the zero (a dataset smaller than one batch
    with ``drop_last``, or an empty one), the message names its size, the batch size and the fix.
    A step budget (``max_steps``) alone does not hide an epoch without batches.

    Example::

        check_training_steps(0, 0, DataLoader(ten_samples, batch_size=64, drop_last=True))
        # ValueError: the training data gives no batch: 10 samples, batch_size=64 with drop_last=True ...
    """
    if total_steps >= 1 and steps_per_epoch >= 1:
        return
    batch_size, size, drop_last = _loader_shape(loader)
    if isinstance(batch_size, int) and size is not None:
        if size == 0:
            cause, fix = (
                "the training split is empty",
                "give the run training data (check the data path/split)",
            )
        elif drop_last and size < batch_size:
            cause = (
                f"{size} samples, batch_size={batch_size} and drop_last=True drop the only (incomplete) batch"
            )
            fix = (
                f"lower the batch size or keep the incomplete batch (drop_last=False), "
                f"e.g. data.init_args.batch_size={size}"
            )
        else:
            cause, fix = (
                f"{size} samples in batches of {batch_size}",
                "e.g. raise trainer.limit_train_batches",
            )
        raise ValueError(f"the training data gives no batch per epoch, so no optimizer step: {cause}; {fix}")
    raise ValueError(
        "the run has no optimizer steps to schedule "
        f"(total_steps={total_steps}, steps_per_epoch={steps_per_epoch}): the training split gives "
        "no batches within trainer.limit_train_batches/max_steps; e.g. lower data.init_args.batch_size "
        "or raise trainer.limit_train_batches"
    )


def check_wrapper_settings(key: str, settings: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming ``optimizer.<key>.<setting>`` (``lookahead``/``sam``) out of range."""
    for name, value in settings.items():
        rule = _WRAPPER_RULES[key][name]
        if isinstance(value, (list, tuple)):  # one value for every group: a list is not accepted here
            rule = Rule(lambda v: False, rule.allowed, rule.example)
        _check(f"optimizer.{key}", name, value, rule)


def check_optimizer_kwargs(name: str, kwargs: dict[str, Any], accepted: Sequence[str]) -> None:
    """Raise ``ValueError`` naming ``optimizer.kwargs.<key>`` for an unknown or out-of-range value."""
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ValueError(
            f"optimizer.kwargs has {unknown} which optimizer.name={name!r} does not accept; "
            f"valid: {sorted(accepted)}"
        )
    for key, value in kwargs.items():
        _check("optimizer.kwargs", key, value, _OPTIMIZER_RULES.get(key))
