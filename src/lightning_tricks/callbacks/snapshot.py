"""Snapshot Ensembles (Huang et al., 2017, "Snapshot Ensembles: Train 1, get M for free").

Training runs ``M`` cosine cycles; at the end of each cycle, where the learning rate is at its minimum
and the model sits in a local minimum, a copy of the weights (a *snapshot*) is kept. At evaluation the
softmax outputs of the last ``k`` snapshots are averaged. The ensemble costs no extra training, but
``k`` forward passes per prediction.

The schedule is the LightningModule's own: the recipe's ``scheduler: {name: snapshot, interval: step,
kwargs: {cycles: M}}`` is the paper's (``CosineAnnealingWarmRestarts(T_0=ceil(T/M))`` per step), and any
schedule with restarts works (``cosine_restarts`` with warm-up, peak decay or cooldown, a user's
``CosineAnnealingWarmRestarts``, ``CyclicLR``...). :class:`SnapshotEnsemble` only watches it.

Which averaging trick to use:

* :class:`SnapshotEnsemble` averages **predictions** of ``k`` different models from one run. It pays off
  when the cyclic schedule is affordable (the paper recommends ``M = 4..8`` with a large restart LR such
  as 0.2) and ``k`` forward passes at test time are acceptable. Averaging the snapshots' *weights*
  instead does not work: they lie in different minima.
* EMA (``lightning_tricks.callbacks.ema``, built on Lightning's ``EMAWeightAveraging``) averages
  **weights** along one trajectory at every step. One model at test time, almost free, and a good
  default for any schedule; it smooths noise but does not add diversity.
* Lightning's own ``StochasticWeightAveraging`` averages **weights** from the tail of training at a
  constant or cyclic LR and needs a BatchNorm statistics update. Use it as is (this package does not
  reimplement it) when one model at test time must generalise better than the final SGD iterate.

Snapshots and prediction averaging can be combined with independently trained models through
:class:`lightning_tricks.ensemble.EnsembleClassifier`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from typing_extensions import override

from lightning_tricks._io import atomic_save
from lightning_tricks.callbacks._requirements import require, require_classifier
from lightning_tricks.evaluation import evaluate_prediction_average
from lightning_tricks.recipes.schedules import scheduler_cycle_ends
from lightning_tricks.records import run_dir


@dataclass(frozen=True)
class _SnapshotFile:
    """One snapshot: its 1-based index, the global step it was taken at and the file holding it."""

    index: int
    step: int
    path: str


class SnapshotEnsemble(Callback):
    r"""One snapshot at the end of each cycle of the LR schedule, and evaluation of the averaged softmax.

    The callback never sets the learning rate: the module's scheduler does. It finds the cycle ends in one
    of two ways, chosen at ``on_fit_start``:

    * **From the scheduler**, when it can tell (torch's ``CosineAnnealingWarmRestarts`` and the recipe's
      ``snapshot``/``cosine_restarts`` schedules, also behind a linear warm-up; see
      :func:`~lightning_tricks.recipes.schedules.scheduler_cycle_ends`). Snapshots are taken at the last
      ``cycles`` cycle ends that the training budget completes; too few raise before training starts.
    * **By watching the LR** otherwise: a cycle ends after a step whose LR is lower than the next one,
      once the LR has fallen since the last restart (so a warm-up is not a restart). The last ``cycles``
      snapshots are kept.

    Snapshots (weights and buffers) are written by rank 0 to ``dirpath/snapshot_{i}.pt`` as
    ``{"state_dict", "global_step", "index"}`` (loadable with ``torch.load(weights_only=True)`` and by
    :meth:`lightning_tricks.ensemble.EnsembleClassifier.from_snapshots`), atomically; the checkpoint holds
    only their paths and steps, never model copies. A resumed run reads the files it references.

    During validation and test, once snapshots exist, the last ``ensemble_size`` of them are evaluated
    by :func:`lightning_tricks.evaluation.evaluate_prediction_average`: the module's own
    ``validation_step``/``test_step`` runs on every eval dataloader with ``forward`` returning the log of
    the snapshots' averaged softmax, then with each snapshot's logits, through
    ``torch.func.functional_call`` (the live weights are never touched). Every metric the step logs gets
    a twin: ``val/acc`` gives ``{stage}/acc_ensemble`` and ``{stage}/acc_snapshot_{i}``; ``val/loss``
    (a plain cross-entropy) gives ``{stage}/loss_ensemble``, the NLL of the averaged probabilities.
    Batches go through ``trainer.strategy.batch_to_device`` so DataModule transfer hooks (normalisation)
    apply; the module's ``forward`` must return logits. Between snapshots the fit-time validation result
    is cached, since the ensemble and the validation data do not change.

    Args:
        cycles: Number ``M`` of snapshots (the last ``M`` cycle ends); ``None`` for every cycle end.
        ensemble_size: Number ``k`` of last snapshots averaged at evaluation, ``1 <= k <= cycles``;
            ``None`` for all of them.
        reset_momentum: Clear the optimizer state (momentum buffers, Adam moments) at each restart.
        dirpath: Folder for snapshot files; defaults to ``checkpoints`` in the run's own folder
            (:func:`lightning_tricks.run_dir`: the logger's versioned folder, or the W&B run's).

    Raises:
        ValueError: On a bad argument, and at ``on_fit_start`` when no LR scheduler is configured or the
            scheduler completes fewer than ``cycles`` cycles in the training budget.
        FileNotFoundError: When a snapshot file the checkpoint references is missing.

    Example::

        from lightning.pytorch import Trainer
        from lightning_tricks.callbacks.snapshot import SnapshotEnsemble
        from lightning_tricks.recipes import ImageClassifier, SchedulerConfig

        schedule = SchedulerConfig("snapshot", interval="step", kwargs={"cycles": 5})
        model = ImageClassifier("resnet56", scheduler=schedule)
        trainer = Trainer(max_epochs=200, callbacks=[SnapshotEnsemble(cycles=5)])
        trainer.fit(model, datamodule)     # logs val/acc_ensemble beside val/acc
        trainer.test(model, datamodule)    # logs test/acc_ensemble, test/acc_snapshot_1..5

    .. tip:: Several instances can coexist: each has its own ``state_key``.
    """

    def __init__(
        self,
        cycles: int | None = None,
        ensemble_size: int | None = None,
        reset_momentum: bool = False,
        dirpath: str | None = None,
    ) -> None:
        if cycles is not None and (isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1):
            raise ValueError(f"`cycles` must be None or an integer >= 1, got {cycles!r}")
        if ensemble_size is not None and (
            isinstance(ensemble_size, bool)
            or not isinstance(ensemble_size, int)
            or not 1 <= ensemble_size <= (cycles or ensemble_size)
        ):
            raise ValueError(
                f"`ensemble_size` must be None or an integer in [1, cycles={cycles}], got {ensemble_size!r}"
            )
        if not isinstance(reset_momentum, bool):
            raise ValueError(f"`reset_momentum` must be a bool, got {reset_momentum!r}")
        self.cycles = cycles
        self.ensemble_size = ensemble_size
        self.reset_momentum = reset_momentum
        self.dirpath = dirpath

        self._snapshots: list[_SnapshotFile] = []
        self._taken = 0
        # Known cycle ends, in progress points (global steps, or epochs for an epoch-interval scheduler).
        self._snapshot_points: list[int] = []
        self._restart_points: set[int] = set()
        self._watch_lr = False
        self._lr_at_step: float | None = None
        self._lr_fell = False
        self._unit: Literal["step", "epoch"] = "step"
        self._last_handled = -1
        # (snapshot count and val batches, self.log arguments and epoch values of the ensemble metrics)
        self._cache: tuple[tuple[Any, ...], dict[str, dict[str, Any]], dict[str, float]] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(cycles=self.cycles)

    @property
    def snapshots(self) -> list[dict[str, torch.Tensor]]:
        """The kept snapshots (CPU ``state_dict``\\ s read from their files), oldest first."""
        return [self._load(s) for s in self._snapshots]

    @property
    def snapshot_steps(self) -> list[int]:
        """The global step at which each kept snapshot was taken."""
        return [s.step for s in self._snapshots]

    @property
    def snapshot_paths(self) -> list[str]:
        """The file of each kept snapshot."""
        return [s.path for s in self._snapshots]

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Nothing here builds a dataloader: the checkpoint is restored only after setup.
        if self.dirpath is None:
            # run_dir broadcasts, so every rank must call it; each run (W&B included) has its own folder.
            self.dirpath = os.path.join(run_dir(trainer), "checkpoints")
        self.dirpath = os.path.abspath(self.dirpath)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        missing = [s.path for s in self._snapshots if not os.path.isfile(s.path)]
        if missing:
            raise FileNotFoundError(
                f"SnapshotEnsemble: the checkpoint references snapshot files that do not exist: {missing}. "
                "Resume on a machine that sees the run's snapshot folder, or start a fresh run"
            )
        require(
            "SnapshotEnsemble",
            trainer,
            pl_module,
            why="it places the snapshots at the cycle ends of one optimizer's LR schedule",
            single_optimizer=True,
        )
        if not trainer.lr_scheduler_configs:
            raise ValueError(
                "SnapshotEnsemble takes snapshots at the restarts of the LR schedule, but "
                "configure_optimizers returned no scheduler. Use one with restarts, e.g. the recipe's "
                "scheduler: {name: snapshot, interval: step, kwargs: {cycles: 5}} or torch's "
                "CosineAnnealingWarmRestarts"
            )
        if trainer.fast_dev_run:
            # A smoke run of a batch or a few completes no cycle: check the setup, take no snapshots.
            rank_zero_info("SnapshotEnsemble: no snapshots under `fast_dev_run`.")
            return
        for config in trainer.lr_scheduler_configs:
            budget, unit = self._budget(trainer, config)
            ends = scheduler_cycle_ends(config.scheduler, budget // config.frequency)
            if ends is not None:
                self._use_cycle_ends(config, [e * config.frequency for e in ends], budget, unit)
                return
        self._watch_lr = True
        rank_zero_info(
            "SnapshotEnsemble: the scheduler does not report its cycles; a cycle ends where the LR rises"
        )

    def _budget(self, trainer: Trainer, config: Any) -> tuple[int, str]:
        """The progress points the run completes: optimizer steps, or complete epochs for epoch schedulers."""
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise ValueError(
                "SnapshotEnsemble needs a finite training budget to place its cycles: set `max_epochs` or "
                "`max_steps` on the Trainer"
            )
        if config.interval != "epoch":
            return int(total), "optimizer steps"
        if trainer.max_epochs is None or trainer.max_epochs < 0:
            raise ValueError("SnapshotEnsemble with an epoch-interval scheduler needs `max_epochs`")
        # Only complete epochs step the scheduler; `max_steps` may end the run before `max_epochs`.
        batches = trainer.num_training_batches
        steps_per_epoch = (
            math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 0
        )
        full_epochs = int(total) // steps_per_epoch if steps_per_epoch > 0 else 0
        return min(trainer.max_epochs, full_epochs), "complete epochs"

    def _use_cycle_ends(self, config: Any, points: list[int], budget: int, unit: str) -> None:
        cycles = self.cycles if self.cycles is not None else len(points)
        if len(points) < max(cycles, 1):
            raise ValueError(
                f"`cycles`={self.cycles} but the scheduler {type(config.scheduler).__name__} "
                f"(frequency={config.frequency}) completes only {len(points)} cycles in {budget} {unit}."
                f" Set `cycles` to at most {len(points)}, train longer or use shorter cycles"
            )
        self._unit = "epoch" if config.interval == "epoch" else "step"
        self._snapshot_points = points[-cycles:]
        self._restart_points = {p for p in points if p < budget}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        require_classifier(
            "SnapshotEnsemble", trainer, pl_module, why="it averages the snapshots' softmax probabilities"
        )
        # Runs after the training state is restored.
        self._last_handled = trainer.global_step if self._unit == "step" else trainer.current_epoch

    # --------------------------------------------------------------- training
    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self._watch_lr and optimizer is trainer.optimizers[0]:
            self._lr_at_step = float(optimizer.param_groups[0]["lr"])

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._watch_lr:
            self._watch(trainer, pl_module)
        elif self._unit == "step":
            self._on_progress(trainer, pl_module, trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._watch_lr and self._unit == "epoch":
            self._on_progress(trainer, pl_module, trainer.current_epoch + 1)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._watch_lr and self.cycles is not None and len(self._snapshots) < self.cycles:
            rank_zero_warn(
                f"SnapshotEnsemble: the LR restarted only {len(self._snapshots)} times, fewer than "
                f"`cycles`={self.cycles}; the ensemble has {len(self._snapshots)} members"
            )

    def _watch(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Schedulers have already stepped when this hook runs: the group's lr is the next step's.
        if trainer.global_step == self._last_handled or self._lr_at_step is None:
            return
        self._last_handled = trainer.global_step
        next_lr = float(trainer.optimizers[0].param_groups[0]["lr"])
        if next_lr < self._lr_at_step:
            self._lr_fell = True
        elif next_lr > self._lr_at_step and self._lr_fell:
            self._lr_fell = False
            self._take_snapshot(trainer, pl_module)
            if self.cycles is not None:
                self._snapshots = self._snapshots[-self.cycles :]
            if self.reset_momentum:
                self._clear_optimizer_state(trainer)

    def _on_progress(self, trainer: Trainer, pl_module: LightningModule, point: int) -> None:
        # Under gradient accumulation several batches end on the same step; act once per step.
        if point == self._last_handled:
            return
        self._last_handled = point
        index = len(self._snapshots)
        if index < len(self._snapshot_points) and point == self._snapshot_points[index]:
            self._take_snapshot(trainer, pl_module)
        if self.reset_momentum and point in self._restart_points:
            self._clear_optimizer_state(trainer)

    @staticmethod
    def _clear_optimizer_state(trainer: Trainer) -> None:
        for opt in trainer.optimizers:
            opt.state.clear()

    def _take_snapshot(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._taken += 1
        assert self.dirpath is not None  # set in setup
        path = os.path.join(self.dirpath, f"snapshot_{self._taken}.pt")
        if trainer.is_global_zero:
            state = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
            atomic_save({"state_dict": state, "global_step": trainer.global_step, "index": self._taken}, path)
        trainer.strategy.barrier("SnapshotEnsemble.snapshot")  # every rank may read it from now on
        self._snapshots.append(_SnapshotFile(self._taken, trainer.global_step, path))
        self._cache = None
        rank_zero_info(f"SnapshotEnsemble: snapshot {self._taken} at step {trainer.global_step} -> {path}")

    @staticmethod
    def _load(snapshot: _SnapshotFile) -> dict[str, torch.Tensor]:
        if not os.path.isfile(snapshot.path):
            raise FileNotFoundError(
                f"SnapshotEnsemble: snapshot {snapshot.index} (step {snapshot.step}) is missing: "
                f"{snapshot.path}"
            )
        return torch.load(snapshot.path, map_location="cpu", weights_only=True)["state_dict"]

    # ------------------------------------------------------------- evaluation
    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not self._snapshots:
            return
        key = (len(self._snapshots), tuple(trainer.num_val_batches))
        fitting = trainer.state.fn == "fit"
        if fitting and self._cache is not None and self._cache[0] == key and self._cache[2]:
            _, arguments, values = self._cache
            for name, value in values.items():
                pl_module.log(name, value, **arguments[name])
            return
        arguments = evaluate_prediction_average(trainer, pl_module, "val", self._members())
        # The epoch values are read back in on_validation_end and logged again until the next snapshot.
        self._cache = (key, arguments, {}) if fitting else None

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._cache is None or self._cache[2] or trainer.sanity_checking:
            return
        key, arguments, _ = self._cache
        metrics = trainer.callback_metrics
        values = {name: float(metrics[name]) for name in arguments if name in metrics}
        self._cache = (key, arguments, values)

    @override
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn != "fit":
            self._warn_if_empty("validate")

    @override
    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._warn_if_empty("test")

    def _warn_if_empty(self, entry: str) -> None:
        # Runs after `ckpt_path` is restored: empty here means no ensemble metric will be logged.
        if not self._snapshots:
            rank_zero_warn(
                f"SnapshotEnsemble has no snapshots, so `trainer.{entry}` logs no `_ensemble` or"
                f" `_snapshot_i` metrics. Call it after `fit` with the same callback, or pass `ckpt_path=`"
                f" of a checkpoint that fit wrote (it holds the snapshot list)."
            )

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._snapshots:
            evaluate_prediction_average(trainer, pl_module, "test", self._members())

    def _members(self) -> dict[str, dict[str, torch.Tensor]]:
        """The last ``ensemble_size`` snapshots, read from their files now, by metric suffix:
        ``{"_snapshot_3": state_dict, ...}``."""
        k = len(self._snapshots) if self.ensemble_size is None else self.ensemble_size
        return {f"_snapshot_{s.index}": self._load(s) for s in self._snapshots[-k:]}

    # ------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        """Paths and steps of the snapshots (no weights), and the LR watcher's state."""
        return {
            "snapshot_indices": [s.index for s in self._snapshots],
            "snapshot_steps": [s.step for s in self._snapshots],
            "snapshot_paths": [s.path for s in self._snapshots],
            "taken": self._taken,
            "lr_fell": self._lr_fell,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._snapshots = [
            _SnapshotFile(int(i), int(step), str(path))
            for i, step, path in zip(
                state_dict["snapshot_indices"],
                state_dict["snapshot_steps"],
                state_dict["snapshot_paths"],
                strict=True,
            )
        ]
        self._taken = int(state_dict["taken"])
        self._lr_fell = bool(state_dict["lr_fell"])
        self._cache = None
