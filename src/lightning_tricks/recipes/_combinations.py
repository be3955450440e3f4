"""Recipe settings that cannot work with the Trainer or DataModule they meet, refused before training.

:meth:`ImageClassifier.setup` calls :func:`check_fit_combinations` at the start of ``fit`` (console
command and plain Python alike). Each refusal is a :class:`~lightning_tricks._cli_errors.ConfigError`
naming the key, the value, why, and a fix.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import GradientAccumulationScheduler

from lightning_tricks._cli_errors import ConfigError


def _accumulation(trainer: Any) -> int:
    """The largest gradient accumulation the run will use (including a GradientAccumulationScheduler's)."""
    scheduled = [
        max(cb.scheduling.values())
        for cb in trainer.callbacks
        if isinstance(cb, GradientAccumulationScheduler) and cb.scheduling
    ]
    return max([trainer.accumulate_grad_batches, *scheduled])


def check_fit_combinations(module: Any, trainer: Any) -> None:
    """Raise :class:`ConfigError` for SAM, AGC or the hinge loss combined with what they cannot work with."""
    sam = module.optimizer_config.sam
    if sam is not None:
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            raise ConfigError(
                "model.init_args.optimizer.sam",
                sam,
                f"cannot run with trainer.precision={trainer.precision!r}: its GradScaler steps the "
                "optimizer without the closure that SAM evaluates twice",
                "trainer.precision=bf16-mixed (or 32-true), or remove optimizer.sam",
            )
        accumulation = _accumulation(trainer)
        if accumulation > 1:
            raise ConfigError(
                "model.init_args.optimizer.sam",
                sam,
                f"cannot run with gradient accumulation ({accumulation} batches per step): its second "
                "gradient would come from the last batch alone",
                "trainer.accumulate_grad_batches=1 (raise data.init_args.batch_size instead), or remove "
                "optimizer.sam",
            )
    clipping = module.gradient_clipping
    if clipping is not None and trainer.gradient_clip_val:
        raise ConfigError(
            "model.init_args.gradient_clipping",
            {"mode": clipping.mode},
            f"and trainer.gradient_clip_val={trainer.gradient_clip_val} would both clip every step",
            "keep one: remove trainer.gradient_clip_val (or set it null), or remove "
            "model.init_args.gradient_clipping",
        )
    if module.loss != "cross_entropy":
        soft = list(getattr(trainer.datamodule, "batch_augment", None) or [])
        if soft:
            raise ConfigError(
                "model.init_args.loss",
                module.loss,
                f"needs class-index targets, but data.init_args.batch_augment={soft} makes soft (mixed) ones",
                "data.init_args.batch_augment=null, or model.init_args.loss=cross_entropy",
            )
