"""Refuse, before training, a module a callback cannot work with (private).

Called from a callback's ``on_fit_start`` (optimizers exist by then, no step has run), so an
unsupported setup fails with a ``ValueError`` that says why and what to do instead of failing or
silently doing the wrong thing mid-run.

Example::

    def on_fit_start(self, trainer, pl_module):
        require(
            "OptimizerSwitch", trainer, pl_module, single_optimizer=True,
            why="it replaces the one optimizer by SGD",
        )
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from lightning_tricks import adapters
from lightning_tricks.callbacks._sanity import draw_batches


def require(
    owner: str,
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    *,
    why: str,
    automatic_optimization: bool = False,
    single_optimizer: bool = False,
) -> None:
    """Raise ``ValueError`` when the module uses manual optimization or several optimizers and
    ``owner`` needs automatic optimization or exactly one optimizer; ``why`` says what needs it."""
    if automatic_optimization and not pl_module.automatic_optimization:
        raise ValueError(
            f"{owner} needs automatic optimization ({why}), but this module sets "
            "`automatic_optimization = False`. Remove it from the callbacks for this module, or let "
            "Lightning run the optimizer step (return the loss from training_step)."
        )
    if single_optimizer and len(trainer.optimizers) != 1:
        raise ValueError(
            f"{owner} needs exactly one optimizer ({why}), but configure_optimizers returned "
            f"{len(trainer.optimizers)}. Remove it from the callbacks for this module, or return one "
            "optimizer (several parameter groups are fine)."
        )


def require_classifier(owner: str, trainer: pl.Trainer, pl_module: pl.LightningModule, *, why: str) -> None:
    """Raise ``ValueError`` unless ``forward`` on one training batch gives ``(N, C)`` logits, ``C >= 2``.

    Runs one no-grad forward pass in eval mode (training flags restored, RNG isolated); call it at
    ``on_train_start``, when the training data exists and no step has run. Nothing to judge (no
    training data) passes.
    """
    with isolate_rng(include_cuda=True), torch.no_grad():
        batches = draw_batches(trainer, num_batches=1)
        if not batches:
            return
        modes = {m: m.training for m in pl_module.modules()}
        pl_module.eval()
        try:
            with trainer.precision_plugin.val_step_context():
                output = pl_module(adapters.inputs_of(batches[0], pl_module))
            try:
                logits: Tensor | None = adapters.logits_of(output, pl_module)
                problem = None
            except ValueError as err:
                logits, problem = None, str(err)
        finally:
            for module, training in modes.items():
                module.training = training
    if logits is not None and (logits.ndim != 2 or logits.shape[1] < 2):
        problem = f"forward returns logits of shape {tuple(logits.shape)}, not (batch, num_classes >= 2)"
    if problem is not None:
        raise ValueError(
            f"{owner} needs a classifier ({why}), but {problem}. Remove it from the callbacks for this "
            "module, or define `logits_of(self, output)` on the module returning the (N, C) class logits."
        )
