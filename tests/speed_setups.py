"""Training set-ups shared by the step host-read tests (CPU) and the CUDA speed tests.

* :func:`speedrun_parts`: the recipe, DataModule and callbacks of ``configs/cifar10_speedrun.yaml``,
  read from that file (so the tests follow the shipped config), on CIFAR-shaped synthetic data and
  with a narrow airbench network so a few steps take milliseconds.
* :func:`stack_parts`: the recipe with the callback stack of ``benchmarks/step_overhead.py`` (EMA,
  SnapshotEnsemble, SmoothedEarlyStopping, TrainingDiagnostics) on the digits.
* :func:`one_step_loss_and_grads`: one training step's loss and gradients, for comparing a speed
  switch (channels_last, compile, bf16 autocast) with the plain path on one device.
* :class:`StepPhases`: a callback that labels each moment of ``fit`` with the training step it
  belongs to and whether Lightning writes step logs on it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import yaml

from lightning_tricks._lightning_compat import writes_step_logs
from lightning_tricks.callbacks import EMA, SmoothedEarlyStopping, SnapshotEnsemble, TrainingDiagnostics
from lightning_tricks.datamodules import DigitsDataModule, SyntheticDataModule
from lightning_tricks.recipes import ImageClassifier, OptimizerConfig, SchedulerConfig

SPEEDRUN_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cifar10_speedrun.yaml"
# The DataModule arguments of the speedrun config that SyntheticDataModule shares with CIFAR10DataModule.
_SHARED_DATA_ARGS = ("batch_size", "augment", "augment_on_device", "flip_mode", "data_on_device")


def _instantiate(spec: dict[str, Any]) -> Any:
    module, name = spec["class_path"].rsplit(".", 1)
    return getattr(importlib.import_module(module), name)(**spec.get("init_args", {}))


def speedrun_parts(
    num_train: int = 96, batch_size: int = 16, widths: tuple[int, int, int] = (8, 16, 16)
) -> tuple[ImageClassifier, SyntheticDataModule, list[L.Callback]]:
    """``configs/cifar10_speedrun.yaml``'s model and callbacks (checkpointing left out) with a narrow
    airbench, on ``num_train`` synthetic CIFAR-shaped images served as that config serves CIFAR-10
    (resident on the device, batched on-device flip + translate, alternating flips)."""
    config = yaml.safe_load(SPEEDRUN_CONFIG.read_text())
    model_args = dict(config["model"]["init_args"])
    model_args["model_kwargs"] = {**model_args.get("model_kwargs", {}), "widths": widths}
    model_args["compile"] = None  # the CUDA tests compile on their own; compiling takes a minute
    model = ImageClassifier(**model_args)
    data_args = {key: config["data"]["init_args"][key] for key in _SHARED_DATA_ARGS}
    data_args["batch_size"] = batch_size
    datamodule = SyntheticDataModule(num_train=num_train, num_val=0, num_test=0, **data_args)
    callbacks = [
        _instantiate(spec)
        for spec in config["trainer"].get("callbacks", [])
        if not spec["class_path"].endswith("ModelCheckpoint")
    ]
    return model, datamodule, callbacks


def stack_parts() -> tuple[ImageClassifier, DigitsDataModule, list[L.Callback]]:
    """The digits ``small_cnn`` recipe and callback stack timed by ``benchmarks/step_overhead.py``."""
    model = ImageClassifier(
        "small_cnn",
        in_channels=1,
        optimizer=OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, weight_decay=0.0),
        scheduler=SchedulerConfig(name="snapshot", interval="step", warmup=0, kwargs={"cycles": 2}),
    )
    callbacks = [
        EMA(decay=0.99, validate=False),
        SnapshotEnsemble(cycles=2),
        SmoothedEarlyStopping(monitor="train/loss_epoch", check_on_train_epoch_end=True, patience=100),
        TrainingDiagnostics(),
    ]
    return model, DigitsDataModule(batch_size=64, augment=None), callbacks


def one_step_loss_and_grads(
    device: str = "cpu", autocast: torch.dtype | None = None, **kwargs: Any
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Loss and gradients of one ``training_step`` of a seeded ``small_cnn`` recipe (``kwargs``:
    its switches) on a seeded batch on ``device``, under ``torch.autocast(dtype=autocast)`` if given."""
    torch.manual_seed(0)
    model = ImageClassifier("small_cnn", num_classes=4, in_channels=3, **kwargs).to(device)
    model.log = lambda *args, **kw: None
    torch.manual_seed(1)
    batch = (torch.randn(6, 3, 16, 16).to(device), torch.randint(4, (6,)).to(device))
    with torch.autocast(torch.device(device).type, dtype=autocast, enabled=autocast is not None):
        loss = model.training_step(batch, 0)
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters() if p.requires_grad]


@dataclass(frozen=True)
class Step:
    """A training step as :class:`StepPhases` labels it."""

    global_step: int
    batch_idx: int
    writes_logs: bool  # Lightning writes step metrics on it (``log_every_n_steps``)
    last_of_epoch: bool

    @property
    def quiet(self) -> bool:
        """A step that must not read the device: no logs written, not an epoch's last, not the
        fit's first (which initialises, e.g. the whitening layer)."""
        return not self.writes_logs and not self.last_of_epoch and self.global_step > 0


class StepPhases(L.Callback):
    """Sets ``target.phase``: a :class:`Step` from a step's ``on_train_batch_start`` until the next one
    (so the step's forward, backward, optimizer step, ``on_train_batch_end`` hooks, Lightning's
    step-metric update and the fetch and transfer of the next batch belong to it), ``"epoch_start"``
    and ``"epoch_end"`` at those hooks. Put it first in the callbacks."""

    def __init__(self, target: Any) -> None:
        self.target = target
        self.steps: list[Step] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.target.phase = "epoch_start"

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        last = batch_idx == trainer.num_training_batches - 1
        step = Step(trainer.global_step, batch_idx, writes_step_logs(trainer), last)
        self.steps.append(step)
        self.target.phase = step

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.target.phase = "epoch_end"
