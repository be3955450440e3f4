"""Shared machinery of the pre-training sanity checks.

:class:`~lightning_tricks.callbacks.init_loss.InitLossCheck` and
:class:`~lightning_tricks.callbacks.overfit.OverfitTinyBatch` run forward (and backward) passes of
the user's own model before training starts. Everything here exists so that they can do that
without leaving a trace: snapshots of parameters, buffers, gradients, training flags and optimizer
state that are restored bit for bit, a switch that turns regularization off on any module, and a
way to draw already-transferred batches from the training data.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader

ON_FAIL_CHOICES: tuple[str, ...] = ("warn", "raise")

_MISSING = object()


class SanityCheckError(RuntimeError):
    """Raised by a sanity check with ``on_fail="raise"`` when the model fails it.

    Example::

        try:
            trainer.fit(model, datamodule=dm)
        except SanityCheckError as err:
            print(err)  # what failed, the measured values and the likely causes
    """


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


# ---------------------------------------------------------------------------------------------
# Snapshots
# ---------------------------------------------------------------------------------------------


class ModuleSnapshot:
    """Bit-exact copy of a module's parameters, buffers, gradients and per-submodule training flags.

    Buffers are taken from ``named_buffers()`` so non-persistent ones (absent from ``state_dict``) are
    covered too. :meth:`restore` copies the values back into the *same* tensors, so optimizers,
    schedulers and anything else holding references to them keep working.

    Example::

        snapshot = ModuleSnapshot(model)
        try:
            probe(model)
        finally:
            snapshot.restore()
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params = {n: p.detach().clone() for n, p in module.named_parameters(remove_duplicate=False)}
        self.grads = {
            n: None if p.grad is None else p.grad.detach().clone()
            for n, p in module.named_parameters(remove_duplicate=False)
        }
        self.buffers = {n: b.detach().clone() for n, b in module.named_buffers(remove_duplicate=False)}
        self.training = {n: m.training for n, m in module.named_modules(remove_duplicate=False)}

    @torch.no_grad()
    def restore(self) -> None:
        for name, param in self.module.named_parameters(remove_duplicate=False):
            param.copy_(self.params[name])
            saved = self.grads[name]
            param.grad = None if saved is None else saved.clone()
        for name, buf in self.module.named_buffers(remove_duplicate=False):
            if name in self.buffers:
                buf.copy_(self.buffers[name])
        for name, mod in self.module.named_modules(remove_duplicate=False):
            if name in self.training:
                mod.training = self.training[name]


class OptimizerSnapshot:
    """Copy of an optimizer's per-parameter state, param-group hyperparameters and step flag.

    Restored in place (same ``param_groups`` dicts, same ``state`` mapping), unlike
    ``Optimizer.load_state_dict`` which swaps in new dicts and casts tensors; schedulers and
    ``LightningOptimizer`` wrappers that hold references therefore see the original objects.

    Example::

        snapshot = OptimizerSnapshot(optimizer)
        try:
            optimizer.step()
        finally:
            snapshot.restore()
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.state = {p: copy.deepcopy(s) for p, s in optimizer.state.items()}
        self.groups = [
            {k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ]
        self.opt_called = optimizer.__dict__.get("_opt_called", _MISSING)

    def restore(self) -> None:
        opt = self.optimizer
        opt.state.clear()
        opt.state.update(self.state)
        for group, saved in zip(opt.param_groups, self.groups, strict=True):
            for key in [k for k in group if k != "params" and k not in saved]:
                del group[key]
            group.update(saved)
        if self.opt_called is _MISSING:
            opt.__dict__.pop("_opt_called", None)
        else:
            opt._opt_called = self.opt_called  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------
# Regularization and loss
# ---------------------------------------------------------------------------------------------


@contextmanager
def regularization_off(module: nn.Module) -> Iterator[None]:
    """Turn off loss penalties, label smoothing, dropout and DropConnect for the duration.

    Uses the module's ``regularization_scaled(0)`` context manager when it offers one and, for any
    module, sets every dropout layer's ``p`` to 0 (restored afterwards).

    Example::

        with regularization_off(model):
            loss = F.cross_entropy(model(x), y)
    """
    dropouts = [m for m in module.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    saved_p = [m.p for m in dropouts]
    with ExitStack() as stack:
        scaled = getattr(module, "regularization_scaled", None)
        if callable(scaled):
            stack.enter_context(scaled(0))
        try:
            for m in dropouts:
                m.p = 0.0
            yield
        finally:
            for m, p in zip(dropouts, saved_p, strict=True):
                m.p = p


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


def split_batch(batch: Any) -> tuple[Any, Any] | None:
    """``(inputs, targets)`` from a ``(inputs, targets, ...)`` batch, ``None`` for other layouts."""
    if isinstance(batch, (list, tuple)) and len(batch) >= 2:
        return batch[0], batch[1]
    return None


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
        pair = split_batch(batch)
        if pair is not None and isinstance(pair[0], Tensor):
            seen += pair[0].shape[0]
        if num_batches is not None and len(batches) >= num_batches:
            break
        if num_samples is not None and seen >= num_samples:
            break
    return batches
