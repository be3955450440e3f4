"""A small, deterministic digits run with the full trick stack, for the kill-and-resume test.

Run in-process through :func:`train`, or as a script that trains until ``block_step`` optimizer
steps are done (after the last checkpoint before it was written), prints ``ready`` and waits on
stdin so the test can SIGKILL it at that known point, without sleeps:

    python tests/resume_training.py ROOT VARIANT BLOCK_STEP
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger

from lightning_tricks.callbacks import EMA, SmoothedEarlyStopping, SnapshotEnsemble
from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.recipes import ImageClassifier, OptimizerConfig, SchedulerConfig
from lightning_tricks.recipes.regularization import RegularizationConfig

MAX_EPOCHS = 2
CHECKPOINT_EVERY = 7  # optimizer steps; 20 batches per epoch, so most checkpoints are mid-epoch
VARIANTS = ("steps", "steps_snapshot", "epochs_snapshot")


class MemoryLogger(Logger):
    """Keeps every logged ``(step, name) -> value``: what a user's logger receives."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[tuple[int, str], float] = {}

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for key, value in metrics.items():
            self.rows[(step, key)] = float(value)


class Record(L.Callback):
    """Per-step training loss, for comparing runs."""

    def __init__(self) -> None:
        self.step_losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.step_losses[trainer.global_step] = outputs["loss"].item()


class BlockAtStep(L.Callback):
    """At ``step`` optimizer steps, say ``ready`` and wait: the parent kills the process here."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            print("ready", flush=True)
            sys.stdin.read()


def train(
    root: Path,
    variant: str,
    ckpt_path: str | None = None,
    block_step: int | None = None,
    extra_callbacks: list[L.Callback] | None = None,
) -> dict:
    """Train (or resume) the run of ``variant`` under ``root``; return everything the test compares."""
    torch.set_num_threads(1)  # the same reduction order in the test process and the killed child
    L.seed_everything(0, verbose=False)
    snapshot = variant.endswith("_snapshot")
    schedule = (
        SchedulerConfig(name="snapshot", interval="step", warmup=5, kwargs={"cycles": 3})
        if snapshot
        else SchedulerConfig(name="cosine", interval="step", warmup=5)
    )
    model = ImageClassifier(
        "small_cnn",
        num_classes=10,
        in_channels=1,
        optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9),
        scheduler=schedule,
        regularization=RegularizationConfig(dropout=0.3),
    )
    data = DigitsDataModule(batch_size=64, augment="translate", seed=0)
    checkpoint = (
        ModelCheckpoint(dirpath=root / "ckpt", every_n_epochs=1, save_top_k=-1, save_last=True)
        if variant.startswith("epochs")
        else ModelCheckpoint(
            dirpath=root / "ckpt", every_n_train_steps=CHECKPOINT_EVERY, save_top_k=-1, save_last=True
        )
    )
    ema = EMA(decay=0.8)
    stopping = SmoothedEarlyStopping(monitor="val/loss", patience=5)
    record = Record()
    logger = MemoryLogger()
    callbacks: list[L.Callback] = [ema, stopping, record, checkpoint]
    if snapshot:
        callbacks.insert(1, SnapshotEnsemble(dirpath=str(root / "snapshots")))
    if block_step is not None:
        callbacks.append(BlockAtStep(block_step))
    callbacks.extend(extra_callbacks or [])
    trainer = L.Trainer(
        max_epochs=MAX_EPOCHS,
        accelerator="cpu",
        devices=1,
        deterministic=True,
        default_root_dir=str(root),
        logger=logger,
        log_every_n_steps=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    result: dict[str, Any] = {
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
        "ema": {k: v.clone() for k, v in ema.ema_state_dict().items()},
        "early_stopping": stopping.state_dict(),
        "step_losses": record.step_losses,
        "logged": logger.rows,
        "final_metrics": {k: v.item() for k, v in trainer.callback_metrics.items()},
        "global_step": trainer.global_step,
    }
    if snapshot:
        ensemble = next(c for c in callbacks if isinstance(c, SnapshotEnsemble))
        state = ensemble.state_dict()
        result["snapshots"] = [
            (index, step, torch.load(path, weights_only=True)["state_dict"])
            for index, step, path in zip(
                state["snapshot_indices"], state["snapshot_steps"], state["snapshot_paths"], strict=True
            )
        ]
    return result


if __name__ == "__main__":
    train(Path(sys.argv[1]), sys.argv[2], block_step=int(sys.argv[3]))
