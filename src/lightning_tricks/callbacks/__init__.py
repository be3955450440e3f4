"""Callbacks that babysit and improve training on any LightningModule.

Example::

    import lightning as L
    from lightning_tricks.callbacks import EMA, InitLossCheck, LRFinder, SmoothedEarlyStopping

    trainer = L.Trainer(
        callbacks=[
            InitLossCheck(),
            LRFinder(),
            EMA(decay=0.999),
            SmoothedEarlyStopping(monitor="val/loss", smoothing="ema", alpha=0.3, patience=5),
        ]
    )
"""

from lightning_tricks.callbacks._smoothing import MetricSmoother
from lightning_tricks.callbacks.detectors import Finding
from lightning_tricks.callbacks.diagnostics import TrainingDiagnostics
from lightning_tricks.callbacks.early_stopping import SmoothedEarlyStopping
from lightning_tricks.callbacks.ema import EMA
from lightning_tricks.callbacks.init_loss import InitLossCheck
from lightning_tricks.callbacks.lr_finder import LRFinder, LRFinderResults
from lightning_tricks.callbacks.momentum import MomentumSchedule
from lightning_tricks.callbacks.optimizer_switch import OptimizerSwitch
from lightning_tricks.callbacks.overfit import OverfitTinyBatch
from lightning_tricks.callbacks.prediction_csv import PredictionCSVWriter
from lightning_tricks.callbacks.progressive_resizing import ProgressiveResizing
from lightning_tricks.callbacks.sanity import SanityCheckError
from lightning_tricks.callbacks.snapshot import SnapshotEnsemble
from lightning_tricks.callbacks.unfreezing import FineTune, GradualUnfreezing

__all__ = [
    "EMA",
    "Finding",
    "FineTune",
    "GradualUnfreezing",
    "InitLossCheck",
    "LRFinder",
    "LRFinderResults",
    "MetricSmoother",
    "MomentumSchedule",
    "OptimizerSwitch",
    "OverfitTinyBatch",
    "PredictionCSVWriter",
    "ProgressiveResizing",
    "SanityCheckError",
    "SmoothedEarlyStopping",
    "SnapshotEnsemble",
    "TrainingDiagnostics",
]
