"""Machinery shared by the pre-training sanity checks (private).

:class:`~lightning_tricks.callbacks.init_loss.InitLossCheck`,
:class:`~lightning_tricks.callbacks.overfit.OverfitTinyBatch` and the init probe of
:class:`~lightning_tricks.callbacks.diagnostics.TrainingDiagnostics` run forward (and backward) passes of
the user's own model before training starts. This module holds what they share: the failure policy, a
switch that turns regularization off on any module, the classification forward pass and loss, and a
way to draw already-transferred batches from the training data. They run inside
:func:`~lightning_tricks.callbacks._training_state.preserved_training_state`, which restores the model,
optimizer and RNG state bit for bit afterwards. What they read from the module is declared in
:class:`~lightning_tricks.interface.ModuleInterface`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_tricks import adapters
from lightning_tricks.callbacks.sanity import SanityCheckError
from lightning_tricks.interface import fallback_message
from lightning_tricks.recipes.models.layers import dropout_disabled

ON_FAIL_CHOICES: tuple[str, ...] = ("warn", "raise")


def validate_on_fail(on_fail: str) -> str:
    """Return ``on_fail`` if it is ``"warn"`` or ``"raise"``, otherwise raise a ``ValueError``."""
    if on_fail not in ON_FAIL_CHOICES:
        raise ValueError(f"`on_fail` must be one of {ON_FAIL_CHOICES}, got {on_fail!r}")
    return on_fail


def report_failure(message: str, on_fail: str) -> None:
    """Raise :class:`SanityCheckError` (every rank) or warn once on rank 0."""
    if on_fail == "raise":
        raise SanityCheckError(message)
    rank_zero_warn(message, category=UserWarning)


def announce_fallbacks(callback: str, module: nn.Module) -> None:
    """Say once (rank 0) which generic behaviour replaces interface members the module lacks."""
    for members, consequence in (
        (("data_loss",), "the loss is the cross-entropy of the module's output"),
        (("regularization_scaled",), "only its dropout layers are switched off during the check"),
    ):
        message = fallback_message(callback, module, members, consequence)
        if message is not None:
            rank_zero_info(message)


# ---------------------------------------------------------------------------------------------
# Regularization and loss
# ---------------------------------------------------------------------------------------------


@contextmanager
def regularization_off(module: nn.Module) -> Iterator[None]:
    """Turn off loss penalties, label smoothing, dropout and DropConnect for the duration.

    Uses the module's ``regularization_scaled(0)`` context manager when it offers one and, for any
    module, sets every dropout and DropConnect layer's ``p`` to 0 (restored afterwards).

    Example::

        with regularization_off(model):
            loss = F.cross_entropy(model(x), y)
    """
    with ExitStack() as stack:
        scaled = getattr(module, "regularization_scaled", None)
        if callable(scaled):
            stack.enter_context(scaled(0))
        stack.enter_context(dropout_disabled(module))
        yield


def data_loss(module: nn.Module, logits: Tensor, targets: Tensor) -> Tensor:
    """The module's own ``data_loss`` when it has one, otherwise cross-entropy (hard or soft targets)."""
    own = getattr(module, "data_loss", None)
    if callable(own):
        return own(logits, targets)
    return F.cross_entropy(logits.float(), targets)


def classification_skip_reason(module: nn.Module, logits: Any, targets: Any) -> str | None:
    """Why ``(logits, targets)`` is not a C-class cross-entropy problem, or ``None`` if it is."""
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        return f"the model output is {shape}, not 2D logits of shape (batch, num_classes)"
    num_classes = logits.shape[1]
    if num_classes < 2:
        return f"the model has {num_classes} output, so it is not a softmax classifier (regression?)"
    declared = getattr(module, "num_classes", None)
    if isinstance(declared, int) and declared != num_classes:
        return f"the module declares num_classes={declared} but outputs {num_classes} logits"
    if not isinstance(targets, Tensor):
        return f"the targets are {type(targets).__name__}, not a tensor of class indices or probabilities"
    if targets.ndim == 1 and not targets.is_floating_point():
        if targets.shape[0] != logits.shape[0]:
            return f"{targets.shape[0]} targets for {logits.shape[0]} outputs"
        if targets.numel() and (targets.min() < 0 or targets.max() >= num_classes):
            return (
                f"target class indices span [{int(targets.min())}, {int(targets.max())}] "
                f"but the model outputs {num_classes} logits"
            )
        return None
    if targets.ndim == 2 and targets.is_floating_point() and targets.shape == logits.shape:
        sums = targets.sum(dim=1)
        if (targets >= 0).all() and torch.allclose(sums, torch.ones_like(sums), atol=1e-3):
            return None
        return "the (N, C) float targets are not probability vectors (rows must be >= 0 and sum to 1)"
    return (
        f"the targets ({tuple(targets.shape)}, {targets.dtype}) are neither class indices (N,) int64 "
        f"nor class probabilities matching the output {tuple(logits.shape)}"
    )


def classifier_forward(
    trainer: pl.Trainer, module: nn.Module, inputs: Any, targets: Any
) -> tuple[Any, str | None]:
    """Run ``module(inputs)`` in the training precision context and check it is a C-class classifier.

    The logits are read from the output through :func:`lightning_tricks.adapters.logits_of` (a logits
    Tensor, a tuple whose first element is one, a dict with ``logits``, or the module's ``logits_of``).

    Returns:
        The logits, and ``None`` when ``(logits, targets)`` is a classification cross-entropy
        problem, otherwise why it is not.
    """
    with trainer.precision_plugin.train_step_context():
        output = module(inputs)
    try:
        logits = adapters.logits_of(output, module)
    except ValueError as err:
        return output, f"the loss is not a classification cross-entropy: {err}"
    reason = classification_skip_reason(module, logits, targets)
    if reason is not None:
        reason = f"the loss is not a classification cross-entropy: {reason}"
    return logits, reason


def split_batch(batch: Any, module: nn.Module) -> tuple[Any, Any] | str:
    """``(inputs, targets)`` of a batch through :func:`lightning_tricks.adapters.split_batch`, or why not."""
    try:
        return adapters.split_batch(batch, module)
    except ValueError as err:
        return str(err)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def first_train_loader(trainer: pl.Trainer) -> Any:
    """The first training dataloader (the user's object, not Lightning's ``CombinedLoader``)."""
    loaders = trainer.train_dataloader
    if loaders is None:
        return None
    if isinstance(loaders, DataLoader) or not isinstance(loaders, (list, tuple, dict)):
        return loaders
    values = list(loaders.values()) if isinstance(loaders, dict) else list(loaders)
    return values[0] if values else None


def draw_batches(
    trainer: pl.Trainer, num_batches: int | None = None, num_samples: int | None = None
) -> list[Any]:
    """Batches from the first training loader, moved and transformed like in training.

    Each batch goes through ``trainer.strategy.batch_to_device``, which runs the LightningModule's and
    DataModule's ``on_before_batch_transfer``/``on_after_batch_transfer`` hooks (normalisation and
    on-device augmentation of in-memory DataModules happen there). Stops after ``num_batches`` batches
    or once ``num_samples`` samples are collected. Call it under ``isolate_rng``: a shuffling loader
    draws its permutation from the global generator.
    """
    loader = first_train_loader(trainer)
    if loader is None:
        return []
    batches: list[Any] = []
    seen = 0
    for batch in loader:
        batch = trainer.strategy.batch_to_device(batch)
        batches.append(batch)
        pair = split_batch(batch, trainer.lightning_module)
        if isinstance(pair, tuple) and isinstance(pair[0], Tensor):
            seen += pair[0].shape[0]
        if num_batches is not None and len(batches) >= num_batches:
            break
        if num_samples is not None and seen >= num_samples:
            break
    return batches
