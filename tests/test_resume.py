"""Kill-and-resume: a run SIGKILLed mid-epoch and resumed from its last checkpoint ends bit-identical
to the run that was never stopped (CPU, deterministic mode), with EMA, snapshots, smoothed early
stopping, a warm-up schedule, augmentation, dropout and step checkpoints all in play."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from resume_training import MAX_EPOCHS, train

from lightning_tricks.callbacks import LRFinder
from lightning_tricks.callbacks._sanity import draw_batches
from lightning_tricks.callbacks._training_state import preserved_training_state

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent
SRC = str(TESTS.parent / "src")
BATCHES_PER_EPOCH = 20  # digits train split (1,257 images) in batches of 64


def _killed_run(root: Path, variant: str, block_step: int) -> None:
    """Start the run in a child process and SIGKILL it once it reports ``block_step`` steps done."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, str(TESTS)])}
    child = subprocess.Popen(
        [sys.executable, str(TESTS / "resume_training.py"), str(root), variant, str(block_step)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        # Blocks until the child reports, however slow the machine; only its own output is read.
        lines = iter(child.stdout.readline, b"")
        assert any(line.strip() == b"ready" for line in lines), "the training child ended before the kill"
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def _assert_same_tensors(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    different = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not different, f"not bit-identical: {different}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cache: dict[str, dict] = {}

    def run(variant: str) -> dict:
        if variant not in cache:
            root = tmp_path_factory.mktemp(f"uninterrupted_{variant}")
            cache[variant] = {**train(root, variant), "root": root}
        return cache[variant]

    return run


@pytest.mark.parametrize(
    ("variant", "block_step", "resumed_from"),
    [
        ("steps", 30, 28),  # killed 2 steps after the step-28 checkpoint, 8 batches into epoch 1
        ("steps_snapshot", 30, 28),
        ("epochs_snapshot", 23, 20),  # killed 3 batches into epoch 1; the last checkpoint ended epoch 0
    ],
)
def test_sigkill_then_resume_equals_the_uninterrupted_run(
    tmp_path, uninterrupted, variant, block_step, resumed_from
):
    _killed_run(tmp_path, variant, block_step)
    last = tmp_path / "ckpt" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == resumed_from
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())

    # `ckpt_path="last"` is Lightning's: the newest `last*.ckpt` in the ModelCheckpoint's dirpath.
    resumed = train(tmp_path, variant, ckpt_path="last")
    reference = uninterrupted(variant)

    assert resumed["global_step"] == reference["global_step"] == MAX_EPOCHS * BATCHES_PER_EPOCH
    _assert_same_tensors(resumed["weights"], reference["weights"])
    _assert_same_tensors(resumed["ema"], reference["ema"])
    assert resumed["early_stopping"] == reference["early_stopping"]
    later_steps = {s: v for s, v in reference["step_losses"].items() if s > resumed_from}
    assert resumed["step_losses"] == later_steps
    later_rows = {key: v for key, v in reference["logged"].items() if key[0] > resumed_from}
    different = {
        k: (resumed["logged"].get(k), v) for k, v in later_rows.items() if resumed["logged"].get(k) != v
    }
    assert not different, f"logged (step, name): (resumed, uninterrupted) {different}"
    assert {k for k in resumed["logged"] if k[0] > resumed_from} == later_rows.keys()
    assert resumed["final_metrics"] == reference["final_metrics"]
    if "snapshots" in reference:
        assert [s[:2] for s in resumed["snapshots"]] == [s[:2] for s in reference["snapshots"]]
        for (_, _, weights), (_, _, expected) in zip(
            resumed["snapshots"], reference["snapshots"], strict=True
        ):
            _assert_same_tensors(weights, expected)


class ProbeBeforeTraining(L.Callback):
    """Draws training batches before the first step, like the sanity checks and the init probe do
    (they skip resumed runs themselves); keeps the first probed batch for comparison."""

    def __init__(self) -> None:
        self.probed: tuple[torch.Tensor, ...] | None = None
        self.first_trained: tuple[torch.Tensor, ...] | None = None

    def on_train_start(self, trainer, pl_module):
        with preserved_training_state(trainer, pl_module):
            self.probed = tuple(t.clone() for t in draw_batches(trainer, num_batches=2)[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first_trained is None:
            self.first_trained = tuple(t.clone() for t in batch)


def test_probes_before_the_first_step_of_a_resumed_run_change_nothing(tmp_path, uninterrupted):
    """SnapshotEnsemble's classifier probe, an LR range test (apply=False) and a sanity-style probe all
    draw training batches before the resumed run's first step; the run still ends bit-identical."""
    reference = uninterrupted("steps_snapshot")
    checkpoint = reference["root"] / "ckpt" / "epoch=1-step=28.ckpt"
    probe = ProbeBeforeTraining()
    finder = LRFinder(num_steps=10, apply=False, plot=False)
    resumed = train(tmp_path, "steps_snapshot", ckpt_path=str(checkpoint), extra_callbacks=[finder, probe])

    assert finder.results is not None and finder.results.lrs  # the range test did run
    # The probe saw the batch the resumed run trains on first (same images, same augmentation draw).
    for probed, trained in zip(probe.probed, probe.first_trained, strict=True):
        assert torch.equal(probed, trained)
    _assert_same_tensors(resumed["weights"], reference["weights"])
    assert resumed["step_losses"] == {s: v for s, v in reference["step_losses"].items() if s > 28}
    for (_, _, weights), (_, _, expected) in zip(resumed["snapshots"], reference["snapshots"], strict=True):
        _assert_same_tensors(weights, expected)
