"""On a GPU, the speedrun recipe's training step never synchronises the device on quiet steps.

``configs/cifar10_speedrun.yaml``'s settings (a narrow airbench, ``bf16-mixed``, ``channels_last``,
``data_on_device``, batched on-device flip + translate, the lookahead EMA) train two epochs with
``torch.cuda.set_sync_debug_mode("error")`` switched on from each quiet step's
``on_train_batch_start`` (no logs written, not an epoch's last, not the fit's first) to the next
step's: any device -> host read, blocking host -> device copy, stream or device synchronisation in
the forward, backward, optimizer and schedule step, the ``on_train_batch_end`` hooks, Lightning's
step bookkeeping or the next batch's loading and augmentation raises there and fails the fit.
The CPU counterpart is ``tests/recipes/test_step_host_reads.py``.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import logging_trainer_kwargs
from speed_setups import Step, StepPhases, speedrun_parts

pytestmark = pytest.mark.cuda

LOG_EVERY_N_STEPS = 3
BATCHES_PER_EPOCH = 6
PLANTED_STEP = 1


class SyncDebugOnQuietSteps(StepPhases):
    """Labels the steps (see :class:`StepPhases`) and sets the sync debug mode from the label."""

    def __init__(self) -> None:
        super().__init__(self)
        self.checked: list[Step] = []
        self._phase: object = None

    @property
    def phase(self) -> object:
        return self._phase

    @phase.setter
    def phase(self, value: object) -> None:
        self._phase = value
        quiet = isinstance(value, Step) and value.quiet
        torch.cuda.set_sync_debug_mode("error" if quiet else "default")
        if quiet:
            self.checked.append(value)

    def on_exception(self, trainer, pl_module, exception) -> None:
        torch.cuda.set_sync_debug_mode("default")  # so Lightning's teardown does not raise again


class PlantedRead(L.Callback):
    """Reads the loss (``.item()``) on one quiet step: proves the error mode is live there."""

    def __init__(self) -> None:
        self.raised: str | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 == PLANTED_STEP:
            try:
                outputs["loss"].item()
            except RuntimeError as error:
                self.raised = str(error)


def test_speedrun_step_does_not_synchronise_on_quiet_steps(tmp_path):
    torch.manual_seed(0)
    model, datamodule, callbacks = speedrun_parts(num_train=16 * BATCHES_PER_EPOCH, batch_size=16)
    assert model.channels_last and datamodule.data_on_device
    sync_debug, planted = SyncDebugOnQuietSteps(), PlantedRead()
    trainer = L.Trainer(
        **{
            **logging_trainer_kwargs(tmp_path, LOG_EVERY_N_STEPS),
            "accelerator": "cuda",
            "deterministic": None,  # the speed setup as users run it: torch's kernels left as they are
        },
        precision="bf16-mixed",
        max_epochs=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[sync_debug, *callbacks, planted],
    )
    try:
        trainer.fit(model, datamodule)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert trainer.global_step == 2 * BATCHES_PER_EPOCH
    assert len(sync_debug.checked) >= 6
    assert planted.raised is not None and "synchroniz" in planted.raised
