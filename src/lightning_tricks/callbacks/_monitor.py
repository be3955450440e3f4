"""Monitored metrics, shared by the callbacks: the direction of a metric from its name, early reports of
names that are not logged, and the training loss a module returns.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor

MODES = ("auto", "min", "max")
# Words that say "higher is better" or "lower is better" in a metric name (Keras infers the same way).
MAX_WORDS = frozenset(
    {"acc", "accuracy", "auc", "auroc", "f1", "fbeta", "precision", "recall", "iou", "miou", "map"}
    | {"dice", "r2", "psnr", "ssim", "bleu", "rouge", "kappa", "mcc"}
)
MIN_WORDS = frozenset(
    {
        "loss",
        "nll",
        "ce",
        "error",
        "err",
        "mse",
        "mae",
        "rmse",
        "perplexity",
        "ppl",
        "wer",
        "cer",
        "bpd",
        "kl",
    }
)


def _words(name: str) -> set[str]:
    return set(re.split(r"[^a-z0-9]+", name.lower()))


def infer_mode(monitor: str, owner: str) -> str:
    """``"max"`` for accuracy-like names, ``"min"`` for loss/error-like ones; raises for anything else.

    Example::

        >>> infer_mode("val_acc", "EarlyStopping"), infer_mode("val/loss", "EarlyStopping")
        ('max', 'min')
    """
    words = _words(monitor)
    is_max, is_min = bool(words & MAX_WORDS), bool(words & MIN_WORDS)
    if is_max != is_min:
        return "max" if is_max else "min"
    raise ValueError(
        f"{owner}: `mode='auto'` cannot tell from `monitor={monitor!r}` whether higher or lower is better"
        f" (accuracy-like names mean 'max', loss/error-like names mean 'min'). Set `mode='min'` or"
        f" `mode='max'` explicitly."
    )


def resolve_mode(mode: str, monitor: str, owner: str) -> str:
    """``mode`` itself for ``"min"``/``"max"``, the inferred mode for ``"auto"``; a clear error otherwise."""
    if mode not in MODES:
        raise ValueError(f"{owner}: `mode` must be one of {MODES}, got {mode!r}.")
    return infer_mode(monitor, owner) if mode == "auto" else mode


# Name prefixes of metrics that only a validation run logs.
VALIDATION_STAGES = frozenset({"val", "valid", "validation"})


def _stage(name: str) -> str:
    return re.split(r"[/_.]", name, maxsplit=1)[0]


def is_validation_name(name: str) -> bool:
    """``name`` is a validation metric by its prefix (``val_loss``, ``val/acc``, ``valid.f1``)."""
    return _stage(name).lower() in VALIDATION_STAGES


def validation_off_reason(trainer: Any, pl_module: Any) -> str | None:
    """Why this fit never validates, or ``None`` when it does; call from ``on_train_start`` (the
    validation data are resolved by then).

    Example::

        reason = validation_off_reason(trainer, pl_module)  # "`Trainer(limit_val_batches=0)`"
    """
    if not is_overridden("validation_step", pl_module):
        return "the LightningModule defines no `validation_step`"
    if trainer.limit_val_batches == 0:
        return "`Trainer(limit_val_batches=0)` turns validation off"
    if trainer.val_dataloaders is None:
        return "`fit` got no validation data (no `val_dataloaders` and no `val_dataloader()`)"
    if not sum(trainer.num_val_batches):
        return "the validation data hold no batches"
    return None


def unvalidated_monitor_message(
    owner: str, argument: str, name: str, trainer: Any, pl_module: Any
) -> str | None:
    """The message for a validation ``name`` monitored in a fit that never validates, else ``None``."""
    reason = validation_off_reason(trainer, pl_module) if is_validation_name(name) else None
    if reason is None:
        return None
    return (
        f"{owner}: `{argument}={name!r}` is a validation metric, but this run never validates: {reason}."
        f" Validate with a `validation_step` that logs {name!r} (and validation data), or set"
        f" `{argument}` to a metric that `training_step` logs."
    )


def known_missing(name: str, metrics: Mapping[str, Any]) -> bool:
    """``name`` is not logged although metrics of its stage (the same prefix before ``/``, ``_`` or ``.``)
    are: after the first validation a validation metric that is absent is a wrong name, while a training
    metric may simply not have been logged yet. A variant of a logged name (``val/acc_ema`` next to
    ``val/acc``) is not judged: callbacks such as EMA start logging it only after their first update.

    Example::

        >>> known_missing("val/los", {"val/loss": 1.0}), known_missing("train/loss", {"val/loss": 1.0})
        (True, False)
        >>> known_missing("val/loss_ema", {"val/loss": 1.0})
        False
    """
    if name in metrics or any(name.startswith(f"{m}_") for m in metrics):
        return False
    stage = _stage(name)
    return any(_stage(m) == stage for m in metrics)


def missing_metric_message(
    owner: str, argument: str, name: str, metrics: Mapping[str, Any], where: str = ""
) -> str:
    """The message for a monitored metric that is not logged: what was asked, what exists, and the fix."""
    logged = "`, `".join(metrics) if metrics else ""
    # Only a name of the same stage is a likely typo: `train_loss` is no fix for `val_loss`.
    same_stage = [m for m in metrics if m != name and _stage(m) == _stage(name)]
    close = difflib.get_close_matches(name, same_stage, n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    silent = ""
    if is_validation_name(name) and not any(is_validation_name(m) for m in metrics):
        silent = (
            f" No validation metric is logged at all: does `validation_step` call `self.log({name!r}, ...)`?"
        )
    return (
        f"{owner}: conditioned on metric `{name}` which is not available{where}. Logged metrics:"
        f" `{logged}`.{hint} Set `{argument}` to one of them.{silent}"
    )


def returned_loss(outputs: Any) -> Tensor | None:
    """The scalar loss ``training_step`` returned (as ``on_train_batch_end`` receives it), else ``None``."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, Tensor) and loss.numel() == 1:
        return loss.detach().reshape(())
    return None


class FirstValidationNames:
    """The metric names of the first validation, handed out once, as early as a wrong name can be judged.

    Names logged by the sanity check are handed out at ``on_train_start`` (after the sanity check's own
    hooks, so a caller such as the console's config check can report first, with config keys); without a
    sanity check, at the end of the first validation. Either way no training epoch is lost.

    Example::

        names = self._first_names.at_validation_end(trainer)  # in on_validation_end
        names = self._first_names.at_train_start()  # in on_train_start
        if names is not None and known_missing(self.monitor, names): ...
    """

    def __init__(self) -> None:
        self.done = False
        self._sanity: dict[str, None] | None = None

    def at_validation_end(self, trainer: Any) -> dict[str, None] | None:
        if self.done or trainer.fast_dev_run:
            return None
        names = dict.fromkeys(trainer.callback_metrics)
        if trainer.sanity_checking:
            self._sanity = names  # Lightning clears the metrics after the sanity check: keep the names
            return None
        self.done = True
        return names

    def at_train_start(self) -> dict[str, None] | None:
        if self.done or self._sanity is None:
            return None
        self.done = True
        return self._sanity
