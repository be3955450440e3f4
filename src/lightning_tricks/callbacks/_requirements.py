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
