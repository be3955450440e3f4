"""Progressive resizing (fastai, MosaicML Composer): train on smaller images first, grow them to full size.

The schedule is Composer's ``ProgressiveResizing``: with ``t`` the fraction of training done
(``global_step / total optimizer steps``),

``ramp(t) = 0`` for ``t < delay_fraction``, else ``min((t - delay_fraction) / (1 - delay_fraction -
finetune_fraction), 1)``; ``scale(t) = initial_scale + (1 - initial_scale) * ramp(t)``,

and each side of a training batch becomes ``round(side * scale / size_increment) * size_increment``
(at least ``size_increment``, at most the full side; the full side itself once ``ramp`` reaches 1).
With ``stages=k`` the ramp moves in ``k`` equal steps instead (``floor(k * ramp) / k``): ``stages=1``
is fastai's "small images, then full-size images". Validation, test and predict batches are never
resized. The model must accept smaller images (global pooling before the classifier, as in ResNets):
before the first step of a fresh run, one training batch shrunk to the first size goes through the
model in eval mode (the training state is restored), and a model with a fixed input size (e.g.
``Flatten`` then ``Linear``) is refused with a ``ValueError``.

The resize runs on the training device, in the DataModule's ``on_after_batch_transfer`` after
normalisation (bilinear with antialiasing, ``torchvision.transforms.v2.functional.resize``), so it works
with every DataModule of the project: in-memory (digits, CIFAR, synthetic) and image folders.
Composer's algorithm has no Lightning port, hence this callback.

Example::

    trainer = L.Trainer(max_epochs=30, callbacks=[ProgressiveResizing(initial_scale=0.5)])

or in YAML::

    trainer:
      callbacks:
        - class_path: lightning_tricks.callbacks.ProgressiveResizing
          init_args: {initial_scale: 0.5, delay_fraction: 0.0, finetune_fraction: 0.2, size_increment: 8}
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torchvision.transforms.v2 import functional as TF
from typing_extensions import override

from lightning_tricks.callbacks._sanity import draw_batches, split_batch
from lightning_tricks.callbacks._training_state import preserved_training_state


class ProgressiveResizing(pl.Callback):
    """Resize training batches on a schedule that grows from ``initial_scale`` to full size.

    Args:
        initial_scale: Scale of the image sides at the start, in ``(0, 1]``.
        delay_fraction: Fraction of training held at ``initial_scale`` before the ramp, in ``[0, 1)``.
        finetune_fraction: Final fraction of training at full size, in ``[0, 1)``; with
            ``delay_fraction`` it must leave room for the ramp (sum < 1).
        size_increment: Sides are rounded to a multiple of this (>= 1; 8 suits tensor cores).
        stages: ``None`` for Composer's linear ramp, or the number of equal steps of a stepwise ramp.

    The schedule depends only on the optimizer step and the run's total number of steps, which is
    taken at the start of a fresh fit and saved in the checkpoint (``state_dict``): a resumed run
    follows the same sizes even when it is resumed with a longer ``max_epochs``. The current side is
    logged as ``train/image_size``.

    Raises:
        ValueError: An argument out of range (naming it), an infinite training length, or a DataModule
            that cannot resize batches (not a ``lightning_tricks`` DataModule).
    """

    def __init__(
        self,
        initial_scale: float = 0.5,
        delay_fraction: float = 0.0,
        finetune_fraction: float = 0.2,
        size_increment: int = 8,
        stages: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < initial_scale <= 1.0:
            raise ValueError(
                f"initial_scale must be in (0, 1], got {initial_scale}; e.g. 0.5 for half-size images"
            )
        for name, value in (("delay_fraction", delay_fraction), ("finetune_fraction", finetune_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {value}")
        if not delay_fraction + finetune_fraction < 1.0:
            raise ValueError(
                f"delay_fraction + finetune_fraction must be < 1 to leave room for the ramp, got "
                f"{delay_fraction} + {finetune_fraction}; lower one of them"
            )
        if isinstance(size_increment, bool) or not isinstance(size_increment, int) or size_increment < 1:
            raise ValueError(f"size_increment must be an integer >= 1, got {size_increment!r}; e.g. 8")
        if stages is not None and (isinstance(stages, bool) or not isinstance(stages, int) or stages < 1):
            raise ValueError(f"stages must be None (linear ramp) or an integer >= 1, got {stages!r}")
        self.initial_scale = initial_scale
        self.delay_fraction = delay_fraction
        self.finetune_fraction = finetune_fraction
        self.size_increment = size_increment
        self.stages = stages
        self.total_steps: int | None = None
        self._trainer: pl.Trainer | None = None
        self._datamodule: Any = None
        self._warned = False
        self._last_size: tuple[int, int] | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            initial_scale=self.initial_scale,
            delay_fraction=self.delay_fraction,
            finetune_fraction=self.finetune_fraction,
            size_increment=self.size_increment,
            stages=self.stages,
        )

    # -- the schedule ---------------------------------------------------------------------------
    def ramp(self, step: int, total_steps: int) -> float:
        """The ramp's progress in ``[0, 1]`` at optimizer step ``step`` of ``total_steps``."""
        t = step / total_steps
        if t < self.delay_fraction:
            return 0.0
        progress = min((t - self.delay_fraction) / (1.0 - self.delay_fraction - self.finetune_fraction), 1.0)
        if self.stages is not None:
            progress = math.floor(progress * self.stages) / self.stages
        return progress

    def size_at(self, step: int, total_steps: int, full: tuple[int, int]) -> tuple[int, int]:
        """``(height, width)`` of training images of size ``full`` at step ``step`` of ``total_steps``."""
        progress = self.ramp(step, total_steps)
        if progress >= 1.0:
            return full
        scale = self.initial_scale + (1.0 - self.initial_scale) * progress
        inc = self.size_increment
        height, width = (min(side, max(inc, round(side * scale / inc) * inc)) for side in full)
        return height, width

    # -- Lightning hooks -------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if not hasattr(datamodule, "train_resize"):
            raise ValueError(
                "ProgressiveResizing resizes batches in the DataModule's on_after_batch_transfer and needs a "
                f"lightning_tricks DataModule (digits, CIFAR, synthetic, ImageFolder), got "
                f"{type(datamodule).__name__ if datamodule is not None else 'plain dataloaders'}; "
                "remove the callback or use one of those DataModules"
            )
        if datamodule.train_resize is not None and datamodule.train_resize != self.resize:
            raise ValueError("two ProgressiveResizing callbacks resize the same DataModule; keep one")
        self._trainer, self._datamodule = trainer, datamodule
        datamodule.train_resize = self.resize

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._datamodule is not None and self._datamodule.train_resize == self.resize:
            self._datamodule.train_resize = None
        self._trainer, self._datamodule = None, None

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.total_steps is not None:
            return  # restored from a checkpoint: keep the original run's schedule
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total) or total < 1:
            raise ValueError(
                f"ProgressiveResizing needs a finite training length to schedule sizes, got {total} steps; "
                "set trainer.max_epochs or trainer.max_steps"
            )
        self._check_model_takes_small_images(trainer, pl_module, int(total))
        self.total_steps = int(total)

    def _check_model_takes_small_images(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, total: int
    ) -> None:
        """Refuse, before the first step, a model whose forward fails on the smallest training images
        although it runs on full-size ones (a fixed input size, e.g. ``Flatten`` then ``Linear``)."""
        # Before `total_steps` is set, `resize` leaves the drawn batch at full size.
        with preserved_training_state(trainer, pl_module), torch.no_grad():
            batches = draw_batches(trainer, num_batches=1)
            pair = split_batch(batches[0], pl_module) if batches else None
            if not isinstance(pair, tuple) or not isinstance(pair[0], torch.Tensor) or pair[0].ndim != 4:
                return
            images = pair[0][:2]
            full = (int(images.shape[-2]), int(images.shape[-1]))
            smallest = self.size_at(0, total, full)
            pl_module.eval()
            with trainer.precision_plugin.train_step_context():
                try:
                    pl_module(images)
                except Exception:  # the bare forward needs more than the images: leave it to training
                    return
                try:
                    pl_module(TF.resize(images, list(smallest), antialias=True))
                except RuntimeError as err:
                    raise ValueError(
                        f"ProgressiveResizing(initial_scale={self.initial_scale}) trains on images of"
                        f" {smallest[0]}x{smallest[1]} at first, but {type(pl_module).__name__} takes only"
                        f" {full[0]}x{full[1]} ones ({err}). Give the model a global pooling before its"
                        " classifier (nn.AdaptiveAvgPool2d), or remove the callback."
                    ) from err

    def resize(self, images: torch.Tensor) -> torch.Tensor:
        """Training ``images`` ``(N, C, H, W)`` at the current step's size (called by the DataModule)."""
        trainer = self._trainer
        if trainer is None or self.total_steps is None or images.ndim != 4:
            return images
        full = (int(images.shape[-2]), int(images.shape[-1]))
        size = self.size_at(trainer.global_step, self.total_steps, full)
        smallest = self.size_at(0, self.total_steps, full)
        if smallest == full and not self._warned:
            self._warned = True
            rank_zero_warn(
                f"ProgressiveResizing never shrinks {full[0]}x{full[1]} images with initial_scale="
                f"{self.initial_scale} and size_increment={self.size_increment}; lower size_increment"
            )
        self._last_size = size
        if size == full:
            return images
        return TF.resize(images, list(size), antialias=True)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._last_size is not None:  # the batch was resized (or not) in on_after_batch_transfer
            pl_module.log("train/image_size", float(self._last_size[1]), on_step=True, on_epoch=False)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.total_steps = state_dict.get("total_steps")
