"""The one place where lightning-tricks touches private names of Lightning (and of torch).

Written against Lightning 2.6.x (checked with 2.6.0 and 2.6.6) and torch 2.4-2.14. Everything else in
the package uses public API only; when a Lightning or torch release renames one of the names below,
this module is the only file to adapt. Each function says which private name it wraps and why no
public API does the job.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.tuner.lr_finder import _LRFinder
from torch.optim.lr_scheduler import LRScheduler

LIGHTNING_VERSION_WRITTEN_AGAINST = "2.6"


def lightning_lr_finder_result(
    mode: str, min_lr: float, max_lr: float, num_steps: int, lrs: Sequence[float], losses: Sequence[float]
) -> Any:
    """Lightning's LR-finder result object (``plot()``, ``suggestion()``) filled with a finished curve.

    Private: ``lightning.pytorch.tuner.lr_finder._LRFinder``. Lightning's ``LearningRateFinder.optimal_lr``
    and ``Tuner.lr_find`` return this object; building it keeps :class:`LRFinder` a drop-in replacement.

    Example:

        >>> result = lightning_lr_finder_result("exponential", 1e-5, 1.0, 3, [1e-5, 1e-3, 1.0], [2, 1, 4])
        >>> result.results["lr"]
        [1e-05, 0.001, 1.0]
    """
    result = _LRFinder(mode, min_lr, max_lr, num_steps)
    result.results = {"lr": list(lrs), "loss": list(losses)}
    return result


def optimizer_step_flag(optimizer: torch.optim.Optimizer) -> Any:
    """The flag torch's LR schedulers set when ``optimizer.step()`` ran, or ``None`` when absent.

    Private: ``Optimizer._opt_called`` (torch), read by ``LRScheduler.step`` to warn about calling the
    scheduler before the optimizer. Trial runs restore it so that warning behaves as if they never ran.
    """
    return optimizer.__dict__.get("_opt_called")


def set_optimizer_step_flag(optimizer: torch.optim.Optimizer, flag: Any) -> None:
    """Restore the value :func:`optimizer_step_flag` returned (``None`` removes the flag)."""
    if flag is None:
        optimizer.__dict__.pop("_opt_called", None)
    else:
        optimizer._opt_called = flag  # type: ignore[attr-defined]


def child_schedulers(scheduler: Any) -> list[Any]:
    """Schedulers wrapped by ``SequentialLR``/``ChainedScheduler`` (private ``_schedulers``), else ``[]``."""
    return list(getattr(scheduler, "_schedulers", []) or [])


def set_last_lr(scheduler: Any, values: list[float]) -> None:
    """Overwrite what ``scheduler.get_last_lr()`` returns (private ``LRScheduler._last_lr``).

    Needed after rescaling the learning rates in place: torch only refreshes it on the next ``step()``.
    """
    if isinstance(scheduler, LRScheduler) or hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = list(values)


def early_stopping_checks_on_train_epoch_end(callback: EarlyStopping) -> bool:
    """Whether Lightning's ``EarlyStopping`` runs its check at train-epoch end rather than after validation.

    ``EarlyStopping.setup`` resolves ``check_on_train_epoch_end=None`` into this private flag; a subclass
    that prepares the monitored value just before the check must run at exactly the same point.
    """
    return bool(callback._check_on_train_epoch_end)


def writes_step_logs(trainer: Any) -> bool:
    """Whether Lightning writes this training step's ``on_step`` metrics to the loggers.

    Private: ``trainer._logger_connector.should_update_logs`` (``log_every_n_steps``, counted in batches
    that stepped; ``+ 1`` inside, so it holds during ``training_step``), plus ``fast_dev_run``, which logs
    every step. The recipe logs its per-step values only on these steps, so the values Lightning writes
    are unchanged while the other steps skip ``self.log`` and its device-to-host copies.
    """
    return bool(trainer._logger_connector.should_update_logs or trainer.fast_dev_run)


class CheckpointHparamsHook:
    """LightningCLI mixin: ``reconcile_checkpoint_hparams(merge)`` runs in place of Lightning's merge.

    Private: ``LightningCLI._parse_ckpt_path``, which ``LightningCLI.__init__`` calls right after parsing
    to parse a ``--ckpt_path`` checkpoint's ``hyper_parameters`` over the config; no public hook runs
    between parsing and that merge. The subclass gets Lightning's merge as ``merge`` and must call it.

    Example::

        class MyCLI(CheckpointHparamsHook, LightningCLI):
            def reconcile_checkpoint_hparams(self, merge):
                before = self.config.clone()
                merge()
    """

    def reconcile_checkpoint_hparams(self, merge: Any) -> None:
        merge()

    def merge_checkpoint_hparams(self, subcommand: str, hparams: dict[str, Any], class_path: str) -> None:
        """Lightning's merge, for a checkpoint whose ``hyper_parameters`` hold no ``_class_path``.

        ``_parse_ckpt_path`` merges hyper-parameters with a ``_class_path`` (saved by LightningCLI's
        ``fit``) as ``{"class_path": ..., "dict_kwargs": ...}``; without one (a plain ``Trainer.fit``)
        it parses them as the subclass-mode ``model`` itself, which fails. This is the same merge with
        ``class_path`` supplied by the caller.
        """
        model = {"class_path": class_path, "dict_kwargs": dict(hparams)}
        self.config = self.parser.parse_object({subcommand: {"model": model}}, self.config)  # type: ignore[attr-defined]

    def _parse_ckpt_path(self) -> None:
        self.reconcile_checkpoint_hparams(super()._parse_ckpt_path)  # type: ignore[misc]
