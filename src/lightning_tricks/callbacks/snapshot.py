"""Snapshot Ensembles (Huang et al., 2017, "Snapshot Ensembles: Train 1, get M for free").

Training runs ``M`` cosine cycles; at the end of each cycle, where the learning rate is at its minimum
and the model sits in a local minimum, a copy of the weights (a *snapshot*) is kept. At evaluation the
softmax outputs of the last ``k`` snapshots are averaged. The ensemble costs no extra training, but
``k`` forward passes per prediction.

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
from typing import Any, Literal

import torch
from lightning.fabric.utilities.cloud_io import _atomic_save, get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim.lr_scheduler import CosineAnnealingWarmRestarts
from typing_extensions import override

from lightning_tricks.evaluation import evaluate_prediction_average

_SCHEDULES = ("paper", "user")


def snapshot_lr(step: int, total_steps: int, cycles: int, base_lr: float) -> float:
    """The paper's cyclic cosine learning rate for optimizer step ``step`` (1-based).

    ``a(t) = a0 / 2 * (cos(pi * mod(t - 1, ceil(T / M)) / ceil(T / M)) + 1)``.

    Example::

        >>> snapshot_lr(1, total_steps=100, cycles=5, base_lr=0.2)
        0.2
    """
    cycle_len = math.ceil(total_steps / cycles)
    return base_lr / 2 * (math.cos(math.pi * ((step - 1) % cycle_len) / cycle_len) + 1)


def paper_cycle_ends(total_steps: int, cycles: int) -> list[int]:
    """Optimizer steps (1-based) ending each of the paper's ``cycles`` cycles; the last is cut at T."""
    cycle_len = math.ceil(total_steps / cycles)
    return [min(i * cycle_len, total_steps) for i in range(1, cycles + 1)]


def warm_restart_cycle_ends(t_0: int, t_mult: int, limit: int) -> list[int]:
    """Scheduler steps at which ``CosineAnnealingWarmRestarts(T_0, T_mult)`` ends a cycle, up to ``limit``."""
    ends, end, length = [], t_0, t_0
    while end <= limit:
        ends.append(end)
        length *= t_mult
        end += length
    return ends


class SnapshotEnsemble(Callback):
    r"""Cyclic cosine schedule, one snapshot per cycle, and evaluation of the averaged softmax.

    With ``schedule="paper"`` the callback sets every param group's learning rate before each optimizer
    step to :func:`snapshot_lr` over ``T = trainer.estimated_stepping_batches`` steps, scaled by the
    group's initial LR (or ``lr``). With ``schedule="user"`` the LightningModule's own
    ``CosineAnnealingWarmRestarts`` drives the LR and snapshots are taken at its last ``cycles`` restarts.

    Snapshots (``state_dict`` of weights and buffers) are kept on CPU, stored in the checkpoint and, on
    rank 0, written to ``dirpath/snapshot_{i}.pt`` (``i = 1..cycles``) as
    ``{"state_dict", "global_step", "index"}``, loadable with ``torch.load(weights_only=True)``.

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
        cycles: Number of cycles ``M`` and of snapshots.
        ensemble_size: Number ``k`` of last snapshots averaged at evaluation, ``1 <= k <= cycles``;
            defaults to ``cycles``.
        schedule: ``"paper"`` (the callback sets the LR) or ``"user"`` (the module's own
            ``CosineAnnealingWarmRestarts``).
        lr: Restart learning rate ``a0`` for ``schedule="paper"``; defaults to each param group's initial LR.
        reset_momentum: Clear the optimizer state (momentum buffers, Adam moments) at each restart.
        dirpath: Folder for snapshot files; defaults to ``trainer.log_dir/checkpoints``.
        save_files: Write ``snapshot_{i}.pt`` files.

    Raises:
        MisconfigurationException: On a bad argument, or at ``setup``/``on_fit_start`` when the training
            budget cannot hold ``cycles`` cycles or no ``CosineAnnealingWarmRestarts`` is configured for
            ``schedule="user"``.

    Example::

        from lightning.pytorch import Trainer
        from lightning_tricks.callbacks.snapshot import SnapshotEnsemble

        trainer = Trainer(max_epochs=200, callbacks=[SnapshotEnsemble(cycles=5, ensemble_size=5, lr=0.2)])
        trainer.fit(model, datamodule)     # logs val/acc_ensemble beside val/acc
        trainer.test(model, datamodule)    # logs test/acc_ensemble, test/acc_snapshot_1..5

    .. tip:: Several instances can coexist: each has its own ``state_key``.
    """

    def __init__(
        self,
        cycles: int = 5,
        ensemble_size: int | None = None,
        schedule: Literal["paper", "user"] = "paper",
        lr: float | None = None,
        reset_momentum: bool = False,
        dirpath: str | None = None,
        save_files: bool = True,
    ) -> None:
        if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
            raise MisconfigurationException(f"`cycles` must be an integer >= 1, got {cycles!r}")
        if ensemble_size is None:
            ensemble_size = cycles
        if (
            isinstance(ensemble_size, bool)
            or not isinstance(ensemble_size, int)
            or not 1 <= ensemble_size <= cycles
        ):
            raise MisconfigurationException(
                f"`ensemble_size` must be an integer in [1, cycles={cycles}], got {ensemble_size!r}"
            )
        if schedule not in _SCHEDULES:
            raise MisconfigurationException(f"`schedule` must be one of {_SCHEDULES}, got {schedule!r}")
        if lr is not None and not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
            raise MisconfigurationException(f"`lr` must be a finite number > 0 or None, got {lr!r}")
        if lr is not None and schedule == "user":
            raise MisconfigurationException(
                f"`lr`={lr} only applies to schedule='paper'; with schedule='user' set the optimizer's LR"
            )
        if not isinstance(reset_momentum, bool):
            raise MisconfigurationException(f"`reset_momentum` must be a bool, got {reset_momentum!r}")
        self.cycles = cycles
        self.ensemble_size = ensemble_size
        self.schedule = schedule
        self.lr = None if lr is None else float(lr)
        self.reset_momentum = reset_momentum
        self.dirpath = dirpath
        self.save_files = save_files

        self._snapshots: list[dict[str, torch.Tensor]] = []
        self._snapshot_steps: list[int] = []
        self._base_lrs: list[float] = []
        self._total_steps = 0
        # Progress points (global steps, or epochs for an epoch-interval user scheduler).
        self._snapshot_points: list[int] = []
        self._restart_points: set[int] = set()
        self._unit: Literal["step", "epoch"] = "step"
        self._scheduler_frequency = 1
        self._last_handled = -1
        self._cache: tuple[tuple[int, str, int], dict[str, float]] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(cycles=self.cycles, schedule=self.schedule)

    @property
    def snapshots(self) -> list[dict[str, torch.Tensor]]:
        """The snapshots taken so far (CPU ``state_dict`` copies), oldest first."""
        return list(self._snapshots)

    @property
    def snapshot_steps(self) -> list[int]:
        """The global step at which each snapshot was taken."""
        return list(self._snapshot_steps)

    # ------------------------------------------------------------------ setup
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.dirpath is None:
            # trainer.log_dir broadcasts, so every rank must call it.
            self.dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        if stage != "fit":
            return
        total = trainer.estimated_stepping_batches
        if not math.isfinite(total):
            raise MisconfigurationException(
                "SnapshotEnsemble needs a finite training budget to place its cycles: set `max_epochs` or "
                "`max_steps` on the Trainer"
            )
        self._total_steps = int(total)
        if self.schedule == "paper":
            self._check_paper_cycles(self._total_steps)
            self._snapshot_points = paper_cycle_ends(self._total_steps, self.cycles)
            self._restart_points = set(self._snapshot_points[:-1])

    def _check_paper_cycles(self, total: int) -> None:
        cycle_len = math.ceil(total / self.cycles)
        if self.cycles > total or (self.cycles - 1) * cycle_len >= total:
            raise MisconfigurationException(
                f"`cycles`={self.cycles} does not fit in {total} optimizer steps: cycles of "
                f"ceil({total}/{self.cycles})={cycle_len} steps leave the last cycle empty. Use fewer cycles "
                "or a longer training budget (max_epochs / max_steps)"
            )
        if self.cycles * cycle_len != total:
            rank_zero_warn(
                f"SnapshotEnsemble: {total} optimizer steps are not a multiple of the cycle length "
                f"{cycle_len}, so the last cycle is cut short and its snapshot is taken before its LR "
                "reaches the minimum. Choose a step budget divisible by `cycles` to avoid this."
            )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.schedule == "paper":
            if trainer.lr_scheduler_configs:
                rank_zero_warn(
                    "SnapshotEnsemble(schedule='paper') sets the learning rate itself every step, overriding "
                    "the configured LR scheduler. Remove it, or use schedule='user' with "
                    "CosineAnnealingWarmRestarts."
                )
            return
        self._setup_user_schedule(trainer)

    def _setup_user_schedule(self, trainer: Trainer) -> None:
        configs = [
            c for c in trainer.lr_scheduler_configs if isinstance(c.scheduler, CosineAnnealingWarmRestarts)
        ]
        if not configs:
            raise MisconfigurationException(
                "SnapshotEnsemble(schedule='user') needs a torch.optim.lr_scheduler."
                "CosineAnnealingWarmRestarts returned by configure_optimizers; use schedule='paper' otherwise"
            )
        config = configs[0]
        sched = config.scheduler
        self._unit = "epoch" if config.interval == "epoch" else "step"
        self._scheduler_frequency = config.frequency
        if self._unit == "epoch":
            if trainer.max_epochs is None or trainer.max_epochs < 0:
                raise MisconfigurationException(
                    "SnapshotEnsemble(schedule='user') with an epoch-interval scheduler needs `max_epochs`"
                )
            # Only complete epochs step the scheduler; `max_steps` may end the run before `max_epochs`.
            batches = trainer.num_training_batches
            steps_per_epoch = (
                math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else 0
            )
            full_epochs = self._total_steps // steps_per_epoch if steps_per_epoch > 0 else 0
            budget, unit = min(trainer.max_epochs, full_epochs), "complete epochs"
        else:
            budget, unit = self._total_steps, "optimizer steps"
        ends = warm_restart_cycle_ends(sched.T_0, sched.T_mult, budget // config.frequency)
        if len(ends) < self.cycles:
            raise MisconfigurationException(
                f"`cycles`={self.cycles} but CosineAnnealingWarmRestarts(T_0={sched.T_0}, "
                f"T_mult={sched.T_mult}, "
                f"frequency={config.frequency}) completes only {len(ends)} cycles in {budget} {unit}"
            )
        points = [e * config.frequency for e in ends]
        self._snapshot_points = points[-self.cycles :]
        self._restart_points = {p for p in points if p < budget}

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Runs after the optimizer state is restored; a resumed run keeps the base LRs it saved.
        self._last_handled = trainer.global_step if self._unit == "step" else trainer.current_epoch
        if self.schedule != "paper" or self._base_lrs:
            return
        self._base_lrs = [
            self.lr if self.lr is not None else float(group.get("initial_lr", group["lr"]))
            for opt in trainer.optimizers
            for group in opt.param_groups
        ]

    # --------------------------------------------------------------- training
    @override
    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.schedule != "paper":
            return
        step = min(trainer.global_step + 1, self._total_steps)
        groups = [group for opt in trainer.optimizers for group in opt.param_groups]
        if len(groups) != len(self._base_lrs):
            raise MisconfigurationException(
                f"SnapshotEnsemble saw {len(self._base_lrs)} param groups at the start of training but now "
                f"{len(groups)}; the paper schedule needs a fixed set of param groups"
            )
        for group, base_lr in zip(groups, self._base_lrs, strict=True):
            group["lr"] = snapshot_lr(step, self._total_steps, self.cycles, base_lr)

    @override
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._unit == "step":
            self._on_progress(trainer, pl_module, trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._unit == "epoch":
            self._on_progress(trainer, pl_module, trainer.current_epoch + 1)

    def _on_progress(self, trainer: Trainer, pl_module: LightningModule, point: int) -> None:
        # Under gradient accumulation several batches end on the same step; act once per step.
        if point == self._last_handled:
            return
        self._last_handled = point
        index = len(self._snapshots)
        if index < len(self._snapshot_points) and point == self._snapshot_points[index]:
            self._take_snapshot(trainer, pl_module)
        if self.reset_momentum and point in self._restart_points:
            for opt in trainer.optimizers:
                opt.state.clear()

    def _take_snapshot(self, trainer: Trainer, pl_module: LightningModule) -> None:
        snapshot = {k: v.detach().to("cpu", copy=True) for k, v in pl_module.state_dict().items()}
        self._snapshots.append(snapshot)
        self._snapshot_steps.append(trainer.global_step)
        self._cache = None
        index = len(self._snapshots)
        if self.save_files and trainer.is_global_zero:
            fs = get_filesystem(self.dirpath)
            fs.makedirs(self.dirpath, exist_ok=True)
            path = os.path.join(self.dirpath, f"snapshot_{index}.pt")
            _atomic_save({"state_dict": snapshot, "global_step": trainer.global_step, "index": index}, path)
        rank_zero_info(f"SnapshotEnsemble: snapshot {index}/{self.cycles} at step {trainer.global_step}")

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
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._snapshots:
            evaluate_prediction_average(trainer, pl_module, "test", self._members())

    def _members(self) -> dict[str, dict[str, torch.Tensor]]:
        """The last ``ensemble_size`` snapshots by metric suffix: ``{"_snapshot_3": state_dict, ...}``."""
        k = min(self.ensemble_size, len(self._snapshots))
        start = len(self._snapshots) - k
        return {f"_snapshot_{start + j + 1}": self._snapshots[start + j] for j in range(k)}

    # ------------------------------------------------------------ checkpoint
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "snapshots": [dict(s) for s in self._snapshots],
            "snapshot_steps": list(self._snapshot_steps),
            "base_lrs": list(self._base_lrs),
            "total_steps": self._total_steps,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._snapshots = [dict(s) for s in state_dict.get("snapshots", [])]
        self._snapshot_steps = [int(s) for s in state_dict.get("snapshot_steps", [])]
        self._base_lrs = [float(x) for x in state_dict.get("base_lrs", [])]
        saved_total = int(state_dict.get("total_steps", 0))
        if saved_total and self._total_steps and saved_total != self._total_steps:
            rank_zero_warn(
                f"SnapshotEnsemble: the checkpoint was written for {saved_total} optimizer steps but this "
                "run "
                f"has {self._total_steps}; the remaining cycles follow the new budget."
            )
        self._cache = None
