"""Checks of a built run that would otherwise fail late or silently, made before the first batch.

The console command calls :func:`check_run_config` once the trainer, model and DataModule are built
(``LightningCLI.after_instantiate_classes``). Each problem raises a :class:`ConfigError` naming the
config key, the value and a fix:

* a training budget of zero optimizer steps (``max_epochs: 0``, ``max_steps: 0``,
  ``limit_train_batches: 0``) or ``accumulate_grad_batches < 1`` (training data that gives no batch
  is found once it is loaded, by the recipe's ``check_training_steps``, the one zero-step rule);
* a callback or plateau schedule that monitors a ``val/...`` metric while the run has no validation
  (``val_fraction: 0``, ``val_size: 0``, ``limit_val_batches: 0``): it could never be logged;
* a negative ``trainer.gradient_clip_val`` (Lightning would silently not clip);
* ``--ckpt_path last`` with no last checkpoint to resume from (it would restart at step 0), and a
  ``--ckpt_path`` file that does not exist or is a folder; ``validate``/``test``/``predict`` without
  ``--ckpt_path`` (or ``pretrained``) are warned that they evaluate untrained weights.

Example::

    class MyCLI(LightningCLI):
        def after_instantiate_classes(self):
            check_run_config(self)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_tricks._cli_errors import ConfigError, closest

# DataModule arguments that, at 0 (or None), leave the run without a validation split.
_VALIDATION_SIZE_ARGS = ("val_fraction", "val_size", "num_val")
_CKPT_KEYWORDS = ("best", "last", "hpc")


def check_run_config(cli: Any) -> None:
    """Raise :class:`ConfigError` for a run that cannot do what its configuration asks."""
    config = cli.config_init[cli.subcommand]
    if cli.subcommand == "fit":
        check_budget(cli.trainer)
        check_gradient_clipping(cli.trainer)
        check_validation_monitors(cli)
        cli.trainer.callbacks.append(MonitorCheck(_monitor_keys(cli)))
    check_ckpt_path(cli, config)


def check_budget(trainer: Any) -> None:
    """Zero optimizer steps or zero accumulation are errors, not a silent empty run."""
    if trainer.max_epochs == 0:
        raise ConfigError(
            "trainer.max_epochs",
            0,
            "trains nothing (and the test after fit would report the untrained model)",
            "trainer.max_epochs=10, or trainer.max_epochs=-1 with trainer.max_steps=1000 for a step budget",
        )
    if trainer.max_steps == 0:
        raise ConfigError(
            "trainer.max_steps", 0, "trains nothing", "trainer.max_steps=1000, or -1 for no step limit"
        )
    accumulate = trainer.accumulate_grad_batches
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ConfigError(
            "trainer.accumulate_grad_batches",
            accumulate,
            "must be an integer >= 1 (batches per optimizer step)",
            "trainer.accumulate_grad_batches=1",
        )
    if trainer.limit_train_batches == 0:
        raise ConfigError(
            "trainer.limit_train_batches",
            trainer.limit_train_batches,
            "gives zero training batches, so zero optimizer steps",
            "trainer.limit_train_batches=1.0 (all batches) or a count >= 1",
        )


def check_gradient_clipping(trainer: Any) -> None:
    """A negative clip value would be skipped by Lightning: the run would train without clipping.

    0 stays allowed: it was Lightning's own "no clipping" default before ``None``.
    """
    clip = trainer.gradient_clip_val
    if clip is not None and clip < 0:
        raise ConfigError(
            "trainer.gradient_clip_val",
            clip,
            "is negative: Lightning skips clipping for values <= 0, so the run would not clip at all",
            "trainer.gradient_clip_val=1.0 (the largest gradient norm, or value with "
            "gradient_clip_algorithm=value), or null (or 0) for no clipping",
        )


def _no_validation(cli: Any) -> tuple[str, Any] | None:
    """``(key, value)`` of the setting that leaves the run without validation, if any."""
    trainer = cli.trainer
    if trainer.limit_val_batches == 0:
        return "trainer.limit_val_batches", trainer.limit_val_batches
    data = cli.config[cli.subcommand].get("data")
    init_args = data.get("init_args") if data is not None and hasattr(data, "get") else None
    if init_args is None:
        return None
    for name in _VALIDATION_SIZE_ARGS:
        if name in init_args and not init_args[name]:
            return f"data.init_args.{name}", init_args[name]
    return None


def _monitor_keys(cli: Any) -> dict[int, str]:
    """Config key of each configured callback, by object id, for messages about its monitor."""
    callbacks = cli.config_init[cli.subcommand]["trainer"].get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    return {id(cb): f"trainer.callbacks[{i}].init_args.monitor" for i, cb in enumerate(callbacks)}


class MonitorCheck(Callback):
    """After the sanity-check validation, refuse ``val/...`` monitors that validation never logged.

    Lightning itself notices a wrong monitor name only after the first training epoch, which is then
    lost; the sanity check has already logged every validation metric. Callbacks with
    ``strict=False`` get a warning instead of an error.

    Args:
        keys: Config key of the ``monitor`` of each callback, by ``id()`` of the callback.
    """

    def __init__(self, keys: dict[int, str]) -> None:
        self.keys = keys

    def on_sanity_check_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        logged = sorted(trainer.callback_metrics)
        validation = [name for name in logged if name.startswith("val")]
        if not validation:
            return
        for key, owner, monitor, strict in self._monitors(trainer, pl_module):
            if not monitor.startswith("val") or monitor in logged:
                continue
            guess = closest(monitor, validation) or validation[0]
            problem = (
                f"({owner}) is never logged: the validation logs {', '.join(validation)}, so it would "
                "fail (or be ignored) only after the first training epoch"
            )
            if strict:
                raise ConfigError(key, monitor, problem, f"{key}={guess}")
            rank_zero_warn(
                f"{key}={monitor!r} {problem}; with strict=False it is ignored. Did you mean {guess}?"
            )

    def _monitors(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[tuple[str, str, str, bool]]:
        found = [
            (
                self.keys.get(id(cb), f"{type(cb).__name__}.monitor"),
                type(cb).__name__,
                cb.monitor,
                bool(getattr(cb, "strict", True)),
            )
            for cb in trainer.callbacks
            if isinstance(getattr(cb, "monitor", None), str)
        ]
        scheduler_key = (
            "model.init_args.scheduler.monitor"
            if hasattr(pl_module, "scheduler_config")
            else "lr_scheduler monitor"
        )
        for config in trainer.lr_scheduler_configs:
            if config.reduce_on_plateau and config.monitor:
                found.append((scheduler_key, "plateau scheduler", config.monitor, bool(config.strict)))
        return found


def check_validation_monitors(cli: Any) -> None:
    """A ``val/...`` monitor without a validation split can never be logged: fail before training."""
    missing = _no_validation(cli)
    if missing is None:
        return
    cause_key, cause_value = missing
    callbacks = cli.config_init[cli.subcommand]["trainer"].get("callbacks") or []
    watchers = [
        (f"trainer.callbacks[{i}].init_args.monitor", type(cb).__name__, cb.monitor)
        for i, cb in enumerate(callbacks if isinstance(callbacks, list) else [callbacks])
        if isinstance(getattr(cb, "monitor", None), str)
    ]
    scheduler = getattr(cli.model, "scheduler_config", None)
    if scheduler is not None and scheduler.resolved_name == "plateau":
        watchers.append(("model.init_args.scheduler.monitor", "plateau scheduler", scheduler.monitor))
    for key, owner, monitor in watchers:
        if monitor.startswith("val"):
            raise ConfigError(
                key,
                monitor,
                f"({owner}) can never be logged: the run has no validation ({cause_key}={cause_value!r})",
                f"give the run a validation split (e.g. {cause_key}=0.1) or monitor a train/ metric",
            )


def _last_checkpoints(trainer: Any) -> list[Path]:
    """``last*.ckpt`` files under the checkpoint folders, the logger folders and the root folder."""
    roots = {Path(trainer.default_root_dir)}
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.dirpath:
            roots.add(Path(callback.dirpath))
    for logger in trainer.loggers:
        if logger.save_dir:
            roots.add(Path(logger.save_dir))
    pattern = f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}*{ModelCheckpoint.FILE_EXTENSION}"
    found = {path.resolve() for root in roots if root.is_dir() for path in root.rglob(pattern)}
    return sorted(found, key=lambda path: path.stat().st_mtime)


def warn_untrained_evaluation(cli: Any) -> None:
    """``validate``/``test``/``predict`` without ``--ckpt_path`` evaluate freshly initialised weights."""
    if cli.subcommand == "fit" or cli.config[cli.subcommand].get("model.init_args.pretrained"):
        return
    rank_zero_warn(
        f"ckpt_path is not set: `{cli.subcommand}` runs the model as built from the config, with freshly "
        "initialised weights (no model.init_args.pretrained either). To evaluate a trained model, pass "
        "--ckpt_path=FILE.ckpt (a checkpoint written by fit) or --ckpt_path=last."
    )


def check_ckpt_path(cli: Any, config: Any) -> None:
    """Resolve ``last`` to the newest last checkpoint of earlier runs; refuse a missing file."""
    ckpt_path = config.get("ckpt_path")
    if ckpt_path is None:
        warn_untrained_evaluation(cli)
        return
    if ckpt_path == "last":
        found = _last_checkpoints(cli.trainer)
        if found:
            config["ckpt_path"] = str(found[-1])
            rank_zero_info(f"ckpt_path=last: using {found[-1]}")
            return
        if cli.subcommand != "fit":
            raise ConfigError(
                "ckpt_path",
                "last",
                f"finds no last checkpoint under {cli.trainer.default_root_dir}, so `{cli.subcommand}` "
                "would run on untrained weights",
                "pass --ckpt_path=FILE.ckpt (a checkpoint written by fit)",
            )
        savers = [
            (i, cb)
            for i, cb in enumerate(config["trainer"].get("callbacks") or [])
            if isinstance(cb, ModelCheckpoint)
        ]
        if not any(cb.save_last for _, cb in savers):
            key = f"trainer.callbacks[{savers[0][0]}].init_args.save_last" if savers else "a ModelCheckpoint"
            raise ConfigError(
                "ckpt_path",
                "last",
                f"finds no last checkpoint under {cli.trainer.default_root_dir} and none will be written "
                "(no ModelCheckpoint has save_last set), so the run would silently restart at step 0",
                f"set {key}=true so runs leave a last checkpoint, pass --ckpt_path=FILE.ckpt, "
                "or drop --ckpt_path to start from scratch",
            )
        rank_zero_warn(
            f"ckpt_path=last: no last checkpoint under {cli.trainer.default_root_dir} yet; "
            "this run starts from step 0."
        )
        config["ckpt_path"] = None
        return
    if ckpt_path in _CKPT_KEYWORDS or "://" in str(ckpt_path):
        return
    path = Path(ckpt_path)
    if path.is_dir():
        found = sorted(path.rglob(f"*{ModelCheckpoint.FILE_EXTENSION}"), key=lambda f: f.stat().st_mtime)
        raise ConfigError(
            "ckpt_path",
            str(ckpt_path),
            f"is a folder ({len(found)} checkpoint file(s) inside), not a checkpoint file",
            f"pass one file, e.g. --ckpt_path={found[-1]} (the newest)"
            if found
            else "pass a .ckpt file written by fit, or 'last' to resume the newest last checkpoint",
        )
    if not path.is_file():
        raise ConfigError(
            "ckpt_path",
            str(ckpt_path),
            f"does not exist (looked for {path.resolve()})",
            "pass an existing .ckpt file, or 'last' to resume the newest last checkpoint",
        )
    if path.stat().st_size == 0:
        raise ConfigError(
            "ckpt_path", str(ckpt_path), "is an empty file", "pass a complete checkpoint file written by fit"
        )
