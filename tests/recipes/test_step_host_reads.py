"""The recipe's training step reads nothing back from the device except where it must.

On a GPU, a host read of a device value (``.item()``, ``if tensor:``, ``.tolist()``, ``.cpu()``,
``nonzero``...) makes the host wait for every queued kernel, so it cannot queue the next steps
ahead. The recipe reads back only on the steps Lightning writes logs on (``log_every_n_steps``) and
at epoch ends. These tests record every such call during ``fit`` on the CPU (``host_reads``) and
assert that none happens on the other steps: forward, loss, backward, optimizer and schedule step,
the ``on_train_batch_end`` hooks, Lightning's per-step bookkeeping, and the fetch, transfer and
on-device augmentation of the next batch. ``tests/cuda`` checks the same on a GPU with
``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from helpers import logging_trainer_kwargs
from host_reads import HostRead, HostReadRecorder
from speed_setups import Step, StepPhases, speedrun_parts, stack_parts

LOG_EVERY_N_STEPS = 3
BATCHES_PER_EPOCH = 6
EPOCHS = 2
PLANTED_STEP = 1  # a step on which Lightning writes no logs and no epoch ends


def lightning_reads_a_host_copy(read: HostRead) -> bool:
    """Lightning's one read per step, which does not wait for the device.

    Lightning 2.6 (``_ResultCollection.metrics`` in
    ``lightning/pytorch/trainer/connectors/logger_connector/result.py``) converts every progress-bar
    value to a number after each training step (``convert_tensors_to_scalars`` -> ``to_item`` ->
    ``Tensor.item``), also on the steps it writes no logs on. The only progress-bar value logged
    per step here is the recipe's ``train/loss_step``, logged on logging steps as a host copy
    (``loss.detach().cpu()``) that Lightning keeps on the CPU (``_ResultCollection.log`` moves the
    metric to the value's device), so on a GPU this ``item`` reads host memory.
    """
    return read.kind == "item" and read.called_from(
        "lightning/pytorch/trainer/connectors/logger_connector/result.py", "metrics"
    )


class PlantedRead(L.Callback):
    """A deliberate host read (``if loss > ...:``) on one step, so each test proves it can fail."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 == PLANTED_STEP and outputs["loss"] > 1e9:
            trainer.should_stop = True


def record_fit(
    tmp_path, model, datamodule, callbacks, precision: str = "32-true"
) -> tuple[list[HostRead], list[Step]]:
    """Fit for ``EPOCHS`` epochs under a :class:`HostReadRecorder`; the reads and the steps taken."""
    torch.set_num_threads(1)  # tiny convolutions; steadier on a shared machine (conftest restores it)
    recorder = HostReadRecorder()
    phases = StepPhases(recorder)
    trainer = L.Trainer(
        **logging_trainer_kwargs(tmp_path, LOG_EVERY_N_STEPS),
        max_epochs=EPOCHS,
        precision=precision,
        limit_train_batches=BATCHES_PER_EPOCH,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[phases, *callbacks, PlantedRead()],
    )
    with recorder:
        trainer.fit(model, datamodule)
    return recorder.reads, phases.steps


def test_recorder_sees_each_kind_of_host_read_and_no_device_op():
    t = torch.tensor([0.5, 2.0, 3.0])
    with HostReadRecorder() as recorder:
        total = t.sum() * 2 + torch.ones(3) @ t  # device ops only
        t.to(torch.device("cpu"))
        t[torch.tensor([0, 2])]
        torch.as_tensor(t, device="cpu")
        assert not recorder.reads
        t.sum().item()
        if t[0]:
            pass
        float(t[1])
        math.isfinite(t[1])
        t.tolist()
        t.cpu()
        t.to("cpu")
        t[t > 1]
        t.nonzero()
        f"{total:.3f}"
        torch.tensor([1.0], device="cpu")
        t.new_tensor([2.0])
    kinds = [read.kind for read in recorder.reads]
    assert kinds == [
        "item",
        "__bool__",
        "__float__",
        "__float__",
        "tolist",
        "cpu",
        "to('cpu')",
        "__getitem__(boolean mask)",
        "nonzero",
        "__format__",
        "tensor(host data, device=...)",
        "new_tensor(host data)",
    ]
    assert all(
        read.called_from(__file__, "test_recorder_sees_each_kind_of_host_read_and_no_device_op")
        for read in recorder.reads
    )


@pytest.mark.parametrize(
    ("parts", "precision"),
    [
        # the speedrun config's GPU precision (Lightning runs bf16-mixed on the CPU too)
        pytest.param(
            lambda: speedrun_parts(num_train=16 * BATCHES_PER_EPOCH, batch_size=16),
            "bf16-mixed",
            id="speedrun",
        ),
        pytest.param(lambda: (*stack_parts()[:2], []), "32-true", id="recipe"),
        pytest.param(stack_parts, "32-true", id="recipe_callback_stack"),
    ],
)
def test_training_step_reads_the_device_only_on_logging_steps_and_epoch_ends(tmp_path, parts, precision):
    torch.manual_seed(0)
    model, datamodule, callbacks = parts()
    reads, steps = record_fit(tmp_path, model, datamodule, callbacks, precision)

    quiet = {s for s in steps if s.quiet}
    assert len(steps) == EPOCHS * BATCHES_PER_EPOCH and len(quiet) >= 6
    logging = {s for s in steps if s.writes_logs}
    assert any(r.phase in logging for r in reads), "the recipe reads its step loss on logging steps"
    on_quiet = [r for r in reads if r.phase in quiet and not lightning_reads_a_host_copy(r)]
    planted = [r for r in on_quiet if r.called_from(__file__, "on_train_batch_end")]
    assert [(r.kind, r.phase.global_step) for r in planted] == [("__bool__", PLANTED_STEP)]
    assert [str(r) for r in on_quiet if r not in planted] == []
    # The fit's first step may read once to initialise (the whitening layer), and only for that.
    first = [r for r in reads if isinstance(r.phase, Step) and r.phase.global_step == 0]
    assert all(r.called_from("lightning_tricks/recipes/classifier.py", "on_train_batch_start") for r in first)
