"""An end-of-fit summary: best and final metrics, checkpoints, the final weights, and where files went.

Example::

    import lightning as L
    from lightning_tricks.fit_summary import FitSummary

    trainer = L.Trainer(callbacks=[FitSummary()])
    trainer.fit(model, datamodule=dm)  # prints the table when fit ends
    print(trainer.callbacks[0].rows)   # the same rows as (item, value) pairs
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_tricks.callbacks.final_weights import describe_final_weights
from lightning_tricks.records import RunConfigSaver, run_dir

__all__ = ["FitSummary"]

FinalWeights = Callable[[pl.Trainer], str]


class FitSummary(pl.Callback):
    """Prints, when ``fit`` ends (rank 0), a table of what the run produced and where it is.

    Rows: each checkpoint callback's best score and path, the last checkpoint, the final value of
    every epoch-level metric, which weights the module holds (``final_weights``), the run folder,
    its ``config.yaml`` and plots (``*.png``). ``rows`` keeps them as ``(item, value)`` pairs.

    Args:
        final_weights: ``f(trainer) -> str`` describing the final weights; default
            :func:`lightning_tricks.callbacks.final_weights.describe_final_weights`.
    """

    def __init__(self, final_weights: FinalWeights | None = None) -> None:
        self.final_weights = final_weights or describe_final_weights
        self.rows: list[tuple[str, str]] = []

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        folder = run_dir(trainer)  # collective: every rank
        if not trainer.is_global_zero:
            return
        self.rows = [
            *_checkpoint_rows(trainer),
            *_metric_rows(trainer),
            ("final weights", self.final_weights(trainer)),
            ("run folder", str(folder)),
            *[(label, str(path)) for label, path in _files(trainer, folder)],
        ]
        _print_table(
            self.rows, title=f"fit ended after {trainer.current_epoch} epochs, {trainer.global_step} steps"
        )


def _checkpoint_rows(trainer: pl.Trainer) -> list[tuple[str, str]]:
    rows = []
    for checkpoint in trainer.checkpoint_callbacks:
        if not isinstance(checkpoint, ModelCheckpoint):
            continue
        if checkpoint.monitor and checkpoint.best_model_path:
            score = checkpoint.best_model_score
            value = f"{score.item():.4g}" if isinstance(score, torch.Tensor) else str(score)
            rows.append((f"best {checkpoint.monitor} ({checkpoint.mode})", value))
            rows.append(("best checkpoint", checkpoint.best_model_path))
        elif checkpoint.best_model_path:
            rows.append(("checkpoint", checkpoint.best_model_path))
        if checkpoint.last_model_path:
            rows.append(("last checkpoint", checkpoint.last_model_path))
    return rows


def _metric_rows(trainer: pl.Trainer) -> list[tuple[str, str]]:
    metrics = trainer.callback_metrics
    rows = []
    for name, value in sorted(metrics.items()):
        per_step = name.endswith("_step") or f"{name}_epoch" in metrics  # the epoch value is shown instead
        if per_step or not (isinstance(value, torch.Tensor) and value.numel() == 1):
            continue
        rows.append((f"final {name.removesuffix('_epoch')}", f"{value.item():.4g}"))
    return rows


def _files(trainer: pl.Trainer, folder: Path) -> list[tuple[str, Path]]:
    saved = [callback.config_path for callback in trainer.callbacks if isinstance(callback, RunConfigSaver)]
    config = saved[0] if saved and saved[0] is not None else folder / "config.yaml"
    files = [("config", config)] if config.is_file() else []
    return files + [("plot", path) for path in sorted(folder.glob("*.png"))]


def _print_table(rows: list[tuple[str, str]], title: str) -> None:
    from rich import get_console
    from rich.table import Table

    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for item, value in rows:
        table.add_row(item, value)
    get_console().print(table)
