"""Write a classifier's predictions as one CSV file: index, predicted class, its probability, label.

Built on Lightning's :class:`~lightning.pytorch.callbacks.BasePredictionWriter`; only the file format
is written here. Each batch's rows are kept (four numbers per sample, not the probability tensors),
gathered from every rank at the end of prediction and written by rank 0, sorted by the sample's
index in the predict set, atomically (an error leaves no partial file and an earlier file intact).

Example::

    import lightning as L
    from lightning_tricks.callbacks import PredictionCSVWriter

    trainer = L.Trainer(callbacks=[PredictionCSVWriter("predictions.csv")])
    trainer.predict(model, datamodule=dm)  # -> predictions.csv: index,predicted,probability,label
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_tricks import adapters
from lightning_tricks._io import atomic_write_bytes
from lightning_tricks.records import run_dir

__all__ = ["PredictionCSVWriter"]

# (dataloader index, sample index, predicted class, its probability, true label or None)
Row = tuple[int, int, int, float, int | None]


class PredictionCSVWriter(BasePredictionWriter):
    """Write ``predict_step``'s class probabilities as ``index,predicted,probability[,label]`` rows.

    Args:
        path: the CSV file; a relative path is taken inside the run's folder
            (:func:`lightning_tricks.run_dir`, where the CLI saves ``predict_config.yaml``).
        verbose: print one line naming the file and its number of rows.

    ``predict_step`` must return class probabilities (or scores) of shape ``(batch, classes)``; the
    row's ``probability`` is the largest one. ``label`` is written when the batches carry targets
    (``(inputs, targets, ...)`` or a dict with a target key). With several predict dataloaders a
    first ``dataloader`` column tells them apart. ``index`` is the sample's index in its predict
    dataset, so the rows are in dataset order under DDP too.

    Example::

        trainer = L.Trainer(callbacks=[PredictionCSVWriter("out/predictions.csv")])
    """

    def __init__(self, path: str | os.PathLike = "predictions.csv", verbose: bool = True) -> None:
        if not str(path).strip():
            raise ValueError(
                f"PredictionCSVWriter(path={str(path)!r}): the path is empty; give a file name such as "
                "'predictions.csv'"
            )
        super().__init__(write_interval="batch")
        self.path = Path(path)
        self.verbose = verbose
        self.written_path: Path | None = None
        self._rows: list[Row] = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "predict":
            return
        # run_dir is collective: every rank calls it
        self.written_path = self.path if self.path.is_absolute() else run_dir(trainer) / self.path
        if self.written_path.is_dir():
            raise ValueError(
                f"PredictionCSVWriter(path={str(self.path)!r}): {self.written_path} is a folder; give a file "
                f"name inside it, e.g. {str(self.path / 'predictions.csv')!r}"
            )

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._rows = []

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Keep the batch's rows (written once, at the end of prediction)."""
        probabilities = torch.as_tensor(prediction).detach()
        if probabilities.ndim != 2:
            raise ValueError(
                f"PredictionCSVWriter needs predict_step to return class probabilities of shape "
                f"(batch, classes), got shape {tuple(probabilities.shape)}; return e.g. "
                "`self(x).softmax(dim=1)`, or remove the writer (CLI: --predictions_file null)"
            )
        if batch_indices is None:
            raise ValueError(
                "PredictionCSVWriter needs the samples' indices, which Lightning tracks only for a "
                "predict DataLoader with a sampler; return a torch DataLoader from predict_dataloader"
            )
        best, predicted = probabilities.float().max(dim=1)
        labels = _labels_of(batch, pl_module, len(predicted)) or [None] * len(predicted)
        # one host copy per column, not one per sample
        for index, klass, probability, label in zip(
            batch_indices, predicted.tolist(), best.tolist(), labels, strict=True
        ):
            self._rows.append((dataloader_idx, int(index), klass, probability, label))

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        rows = _gathered(self._rows, trainer)
        self._rows = []
        if trainer.is_global_zero:
            assert self.written_path is not None
            # keyed by (dataloader, index): a sample that a sampler repeats to even out ranks is written once
            rows = sorted({row[:2]: row for row in rows}.values())
            atomic_write_bytes(_csv_bytes(rows), self.written_path)
            if self.verbose:
                rank_zero_info(f"Wrote {len(rows)} predictions to {self.written_path}")
        trainer.strategy.barrier("PredictionCSVWriter")


def _labels_of(batch: Any, module: pl.LightningModule, size: int) -> list[int] | None:
    """The batch's integer class labels, or ``None`` for a batch without (integer) targets."""
    try:
        targets = adapters.split_batch(batch, module)[1]
    except ValueError:
        return None
    if not isinstance(targets, torch.Tensor) or targets.shape != (size,) or targets.is_floating_point():
        return None  # no class indices (soft or multi-label targets): leave the column out
    return [int(t) for t in targets.tolist()]


def _gathered(rows: list[Row], trainer: pl.Trainer) -> list[Row]:
    """Every rank's rows on every rank (``torch.distributed.all_gather_object``: ranks differ in size)."""
    if trainer.world_size == 1 or not torch.distributed.is_initialized():
        return rows
    everyone: list[list[Row] | None] = [None] * trainer.world_size
    torch.distributed.all_gather_object(everyone, rows)
    return [row for part in everyone for row in part or []]


def _csv_bytes(rows: list[Row]) -> bytes:
    several_loaders = len({row[0] for row in rows}) > 1
    with_labels = bool(rows) and all(row[4] is not None for row in rows)
    header = ["index", "predicted", "probability"] + (["label"] if with_labels else [])
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow((["dataloader"] if several_loaders else []) + header)
    for loader, index, predicted, probability, label in rows:
        values = [index, predicted, repr(probability)] + ([label] if with_labels else [])
        writer.writerow(([loader] if several_loaders else []) + values)
    return text.getvalue().encode()
