"""Monitored metrics, shared by the callbacks: the direction of a metric from its name, early reports of
names that are not logged, and the training loss a module returns.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

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


def _stage(name: str) -> str:
    return re.split(r"[/_.]", name, maxsplit=1)[0]


def known_missing(name: str, metrics: Mapping[str, Any]) -> bool:
    """``name`` is not logged although metrics of its stage (the same prefix before ``/``, ``_`` or ``.``)
    are: after the first validation a validation metric that is absent is a wrong name, while a training
    metric may simply not have been logged yet.

    Example::

        >>> known_missing("val/los", {"val/loss": 1.0}), known_missing("train/loss", {"val/loss": 1.0})
        (True, False)
    """
    stage = _stage(name)
    return name not in metrics and any(_stage(m) == stage for m in metrics)


def missing_metric_message(
    owner: str, argument: str, name: str, metrics: Mapping[str, Any], where: str = ""
) -> str:
    """The message for a monitored metric that is not logged: what was asked, what exists, and the fix."""
    logged = "`, `".join(metrics) if metrics else ""
    close = difflib.get_close_matches(name, [m for m in metrics if m != name], n=1)
    hint = f" Did you mean `{close[0]}`?" if close else ""
    return (
        f"{owner}: conditioned on metric `{name}` which is not available{where}. Logged metrics:"
        f" `{logged}`.{hint} Set `{argument}` to one of them."
    )


def returned_loss(outputs: Any) -> Tensor | None:
    """The scalar loss ``training_step`` returned (as ``on_train_batch_end`` receives it), else ``None``."""
    loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
    if isinstance(loss, Tensor) and loss.numel() == 1:
        return loss.detach().reshape(())
    return None
