"""Run an unchanged LightningCLI recipe in-process with dotted overrides, and check overrides early.

The recipe is the ``lightning-tricks fit`` command itself (:func:`lightning_tricks.cli.build_cli`);
an override ``{"model.init_args.optimizer.lr": 0.01}`` is the command-line argument
``--model.init_args.optimizer.lr=0.01``, so a trial is exactly what a user would type.

Within one process the in-memory splits and the training-split statistics of a DataModule are
kept between runs with the same ``data`` config (keyed by that config), so only the first run pays
for loading and fitting them.

Example::

    run = run_recipe(["configs/digits.yaml"], {"trainer.max_epochs": 1}, monitor="val/acc")
    print(run.value, run.fixed_cost_s)
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import lightning.pytorch as pl
import optuna
import torch
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.callbacks import Callback

from lightning_tricks.cli import LightningTricksCLI, build_cli

# Trials pass their own args while sys.argv holds the `search`/`ablate` command line.
warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended", category=UserWarning)
warnings.filterwarnings(
    "ignore", message=".*is experimental.*", category=optuna.exceptions.ExperimentalWarning
)


def override_args(overrides: Mapping[str, Any]) -> list[str]:
    """``{"a.b": v}`` -> ``["--a.b=v"]``: strings as they are, other values as JSON (valid YAML)."""
    return [
        f"--{key}={value if isinstance(value, str) else json.dumps(value)}"
        for key, value in overrides.items()
    ]


def recipe_args(configs: Sequence[str], overrides: Mapping[str, Any]) -> list[str]:
    return [arg for path in configs for arg in ("--config", str(path))] + override_args(overrides)


class _ParseOnlyCLI(LightningTricksCLI):
    """Parses and type-checks a recipe without building any class."""

    def instantiate_classes(self) -> None:
        pass


def parse_recipe(configs: Sequence[str], overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The full config of ``lightning-tricks fit --config ... --key=value ...`` as a plain dict.

    Raises:
        ValueError: When the recipe rejects an override (unknown key, wrong type), naming it.
    """
    overrides = dict(overrides or {})
    try:
        cli = build_cli(
            recipe_args(configs, overrides),
            run=False,
            cli_class=_ParseOnlyCLI,
            exit_on_error=False,
        )
    except ArgumentError as err:
        detail = _innermost_reason(str(err))
        raise ValueError(
            f"The recipe {list(map(str, configs))} rejects the overrides {overrides}: {detail}"
        ) from err
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False, format="yaml"))


def _innermost_reason(message: str) -> str:
    """The deepest line of a jsonargparse union error that says what is wrong (not ``NoneType``)."""
    lines = [line.strip(" -") for line in message.splitlines()]
    reasons = [
        line
        for line in lines
        if ("Expected a" in line and "NoneType" not in line)
        or "is not accepted" in line
        or "not expected" in line
    ]
    return reasons[-1] if reasons else lines[0]


def check_override(configs: Sequence[str], key: str, values: Sequence[Any]) -> None:
    """Fail early when the recipe does not accept ``key`` with each of ``values``.

    Raises:
        ValueError: Naming the key, the value and the fix.
    """
    for value in values:
        try:
            dump = parse_recipe(configs, {key: value})
        except ValueError as err:
            reason = _innermost_reason(str(err.__cause__))
            raise ValueError(
                f"Search space key `{key}` with value {value!r} does not fit the recipe: {reason}. Use a"
                f" dotted key that `lightning-tricks fit --print_config` shows, with values of its type."
            ) from None
        node: Any = dump
        for part in key.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ValueError(
                    f"Search space key `{key}` is not a field of the recipe (no `{part}`); use a dotted key"
                    f" that `lightning-tricks fit --print_config` shows."
                )
            node = node[part]


class _RunRecorder(Callback):
    """Measures the fixed cost (start -> first training batch) and records the monitored metric."""

    def __init__(self, monitor: str | None, started: float) -> None:
        self.monitor = monitor
        self.started = started
        self.fixed_cost_s: float | None = None
        self.reported: list[float] = []
        self.epochs = 0
        self.steps = 0
        self.world_size = 1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fixed_cost_s = time.perf_counter() - self.started
        self.world_size = trainer.world_size

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epochs += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.steps = trainer.global_step

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self.monitor is None or self.monitor not in trainer.callback_metrics:
            return
        self.reported.append(float(trainer.callback_metrics[self.monitor]))


@dataclass
class RecipeRun:
    """Outcome of one in-process run: final metrics, the monitored metric per validation, timings."""

    metrics: dict[str, float] = field(default_factory=dict)
    reported: list[float] = field(default_factory=list)
    epochs: int = 0
    steps: int = 0
    world_size: int = 1
    fixed_cost_s: float = float("nan")
    wall_s: float = float("nan")

    @property
    def value(self) -> float:
        """The monitored metric at the last validation (NaN when none ran)."""
        return self.reported[-1] if self.reported else float("nan")


class _TrialCLI(LightningTricksCLI):
    """The recipe's CLI plus a per-process cache of DataModule splits and statistics."""

    data_cache: ClassVar[dict[str, dict[str, Any]]] = {}
    hyperparameters: ClassVar[dict[str, Any]] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_config_callback"] = None  # trials would overwrite one another's config.yaml
        super().__init__(*args, **kwargs)

    def before_fit(self) -> None:
        for logger in self.trainer.loggers:
            if self.hyperparameters:
                logger.log_hyperparams(dict(self.hyperparameters))
        dm = self.datamodule
        if not hasattr(dm, "load_splits"):
            return
        entry = self.data_cache.setdefault(repr(self.config[self.subcommand]["data"]), {})
        load = dm.load_splits

        def cached_splits() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
            if "splits" not in entry:
                entry["splits"] = load()
            return entry["splits"]

        dm.load_splits = cached_splits  # instance attribute: setup() calls self.load_splits()
        stats = getattr(dm, "stats", None)
        if stats is not None and "stats" in entry:
            stats.load_state_dict(entry["stats"])  # prepare_statistics() then skips fitting
        self._cache_entry = entry

    def after_fit(self) -> None:
        stats = getattr(self.datamodule, "stats", None)
        if stats is not None and stats.fitted and hasattr(self, "_cache_entry"):
            self._cache_entry.setdefault("stats", stats.state_dict())
        super().after_fit()


def run_recipe(
    configs: Sequence[str],
    overrides: Mapping[str, Any],
    *,
    monitor: str | None = None,
    callbacks: Sequence[Callback] = (),
    test: bool = False,
    hyperparameters: Mapping[str, Any] | None = None,
) -> tuple[RecipeRun, BaseException | None]:
    """Run ``lightning-tricks fit`` in this process; returns the run and the exception it ended with.

    ``callbacks`` are added to the recipe's own; ``hyperparameters`` go to every logger
    (``log_hyperparams``), so a W&B run's config shows the sampled values.
    """
    started = time.perf_counter()
    recorder = _RunRecorder(monitor, started)
    run = RecipeRun()
    args = ["fit", *recipe_args(configs, overrides), f"--test_after_fit={json.dumps(test)}"]
    _TrialCLI.hyperparameters = dict(hyperparameters or {})
    error: BaseException | None = None
    cli = None
    try:
        cli = build_cli(
            args,
            cli_class=_TrialCLI,
            trainer_defaults={"callbacks": [recorder, *callbacks]},
        )
    except Exception as exc:  # the caller records it (a crashed trial), the search goes on
        error = exc
    finally:
        _finish_wandb()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if cli is not None:
        run.metrics = {k: float(v) for k, v in cli.trainer.callback_metrics.items() if v.numel() == 1}
    run.reported, run.epochs, run.steps = recorder.reported, recorder.epochs, recorder.steps
    run.world_size = recorder.world_size
    run.fixed_cost_s = recorder.fixed_cost_s if recorder.fixed_cost_s is not None else float("nan")
    run.wall_s = time.perf_counter() - started
    return run, error


def _finish_wandb() -> None:
    """Close the W&B run of a finished trial so the next trial starts its own."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()
