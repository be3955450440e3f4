"""Gradual unfreezing (ULMFiT, fastai's ``freeze_to``) and a head-only warm-up then unfreeze (``fine_tune``).

Both extend Lightning's :class:`~lightning.pytorch.callbacks.BaseFinetuning`. The network's *stages* are
its top-level child modules that own parameters (``print(model.net)`` shows them; ResNet-18: ``conv1``,
``bn1``, ``layer1`` ... ``layer4``, ``fc``); the last stage holds the classifier. Training starts with only
the last stage trainable; at each milestone of ``schedule`` the named stage and every later stage train.

Unfrozen parameters join the running optimizer in the param groups the recipe would have given them
(``ImageClassifier.optimizer_param_groups``: weight-decay split, ``lr_multipliers``,
``optimizer.layer_decay``, linear scaling rule) at the schedule's current position, and the LR schedulers
drive them from then on. For a LightningModule without that method, they join as one group at the nominal lr
of the first group. The unfrozen milestones and the added groups are saved in checkpoints, so a resumed run
has the same trainable set and optimizer groups as an uninterrupted one.

BatchNorm convention: fastai's. With ``train_bn=True`` (default) BatchNorm layers in frozen stages keep
training (their affine parameters learn, their running statistics update): a pretrained network meets new
data. With ``train_bn=False`` they are frozen entirely: parameters fixed and the layers kept in eval mode,
so their running statistics never change either.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BaseFinetuning
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn
from torch.optim import Optimizer

from lightning_tricks.callbacks._param_group_join import add_param_groups, extend_schedulers, nominal_lr
from lightning_tricks.recipes.layer_groups import stage_names

#: Schedule value that unfreezes every stage.
ALL_STAGES = "all"
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def network_of(pl_module: L.LightningModule) -> nn.Module:
    """The network whose stages are frozen: ``pl_module.net`` when there is one, else the module itself."""
    net = getattr(pl_module, "net", None)
    return net if isinstance(net, nn.Module) else pl_module


class GradualUnfreezing(BaseFinetuning):
    """Train the last stage first, then unfreeze earlier stages at the epochs of ``schedule``.

    Args:
        schedule: ``{epoch: stage}``; at the start of ``epoch`` the stage named and all stages after it
            train (fastai's ``freeze_to``). ``"all"`` unfreezes the whole network. Later epochs name earlier
            stages.
        train_bn: Keep BatchNorm layers of frozen stages training (fastai's default); ``False`` freezes them
            entirely (parameters and running statistics, eval mode).

    Example (YAML, under ``trainer.callbacks``)::

        - class_path: lightning_tricks.callbacks.GradualUnfreezing
          init_args: {schedule: {1: layer4, 2: layer3, 3: all}}
    """

    def __init__(self, schedule: dict[int, str], train_bn: bool = True) -> None:
        super().__init__()
        if not isinstance(schedule, dict) or not schedule:
            raise ValueError(
                f"schedule must be a non-empty mapping epoch -> stage, got {schedule!r}; "
                "e.g. {1: layer4, 3: all}"
            )
        for epoch, stage in schedule.items():
            if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
                raise ValueError(f"schedule epoch {epoch!r} must be an integer >= 0; e.g. {{1: layer4}}")
            if not isinstance(stage, str) or not stage:
                raise ValueError(f"schedule[{epoch}]={stage!r} must be a stage name or {ALL_STAGES!r}")
        self.schedule = dict(sorted(schedule.items()))
        self.train_bn = train_bn
        self.unfrozen_epochs: list[int] = []  # milestones already applied (checkpointed)
        self._resuming = False

    # -- stages --------------------------------------------------------------------------------
    def _stages(self, pl_module: L.LightningModule) -> list[tuple[str, nn.Module]]:
        net = network_of(pl_module)
        children = dict(net.named_children())
        return [(name, children[name]) for name in stage_names(net)]

    def _check_schedule(self, names: list[str]) -> None:
        previous = len(names) - 1
        for epoch, stage in self.schedule.items():
            if stage != ALL_STAGES and stage not in names:
                raise ValueError(
                    f"{type(self).__name__} schedule[{epoch}]={stage!r} is not a stage of the network; "
                    f"stages: {', '.join(names)} (or {ALL_STAGES!r})"
                )
            index = 0 if stage == ALL_STAGES else names.index(stage)
            if index > previous:
                raise ValueError(
                    f"{type(self).__name__} schedule[{epoch}]={stage!r} is after an earlier milestone's "
                    "stage; unfreeze from the head towards the input (later epochs name earlier stages)"
                )
            previous = index

    def _first_trainable(self, names: list[str], applied: list[int]) -> int:
        """Index of the first trainable stage after the milestones ``applied``."""
        first = len(names) - 1
        for epoch in applied:
            stage = self.schedule[epoch]
            first = min(first, 0 if stage == ALL_STAGES else names.index(stage))
        return first

    def _set_trainable(self, pl_module: L.LightningModule, first: int, set_modes: bool = False) -> None:
        """Stages before ``first`` frozen (BatchNorm per ``train_bn``), from ``first`` on trainable; with
        ``set_modes`` also the BatchNorm train/eval modes (at epoch start: Lightning warns about modules in
        eval mode when training starts, and its validation loop restores the modes it found)."""
        for index, (_, module) in enumerate(self._stages(pl_module)):
            frozen = index < first
            module.requires_grad_(not frozen)
            for norm in (m for m in module.modules() if isinstance(m, BATCH_NORMS)):
                norm.requires_grad_(not frozen or self.train_bn)
                if set_modes:
                    norm.train(pl_module.training and (not frozen or self.train_bn))

    # -- BaseFinetuning hooks ------------------------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse several processes, then freeze (:meth:`freeze_before_training`)."""
        if trainer.world_size > 1:
            raise ValueError(
                f"{type(self).__name__} runs on one device (trainer world size is {trainer.world_size}): "
                "DistributedDataParallel never synchronises parameters that were frozen when it wrapped the "
                "model, so replicas would drift apart after unfreezing. Train with devices=1, or unfreeze "
                "everything from the start"
            )
        super().setup(trainer, pl_module, stage)

    def freeze_before_training(self, pl_module: L.LightningModule) -> None:
        """Check the schedule against the network's stages, then freeze all but the last stage."""
        names = [name for name, _ in self._stages(pl_module)]
        self._check_schedule(names)
        self._set_trainable(pl_module, len(names) - 1)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """On resume: restore the trainable set, the added param groups and the schedulers' entries."""
        restarting, self._resuming = self._resuming, False
        built = [len(optimizer.param_groups) for optimizer in trainer.optimizers]
        super().on_fit_start(trainer, pl_module)  # restores the param groups saved in the checkpoint
        if not restarting:
            return
        names = [name for name, _ in self._stages(pl_module)]
        self._set_trainable(pl_module, self._first_trainable(names, self.unfrozen_epochs))
        for optimizer, count in zip(trainer.optimizers, built, strict=True):
            added = optimizer.param_groups[count:]
            ref = nominal_lr(optimizer.param_groups[0])
            extend_schedulers(
                self._schedulers_of(trainer, optimizer),
                [nominal_lr(g) / ref for g in added],
                [float(g["lr"]) for g in added],
            )

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)  # calls finetune_function, records new groups
        names = [name for name, _ in self._stages(pl_module)]
        self._set_trainable(pl_module, self._first_trainable(names, self.unfrozen_epochs), set_modes=True)

    def finetune_function(self, pl_module: L.LightningModule, epoch: int, optimizer: Optimizer) -> None:
        """Apply the milestones up to ``epoch`` not applied yet; unfrozen parameters join ``optimizer``."""
        due = [e for e in self.schedule if e <= epoch and e not in self.unfrozen_epochs]
        if not due:
            return
        names = [name for name, _ in self._stages(pl_module)]
        self.unfrozen_epochs = sorted([*self.unfrozen_epochs, *due])
        first = self._first_trainable(names, self.unfrozen_epochs)
        self._set_trainable(pl_module, first)
        known = {id(p) for group in optimizer.param_groups for p in group["params"]}
        groups = []
        for group in self._param_groups(pl_module, optimizer):
            params = [p for p in group["params"] if id(p) not in known and p.requires_grad]
            if params:
                groups.append({**group, "params": params})
        add_param_groups(optimizer, self._schedulers_of(pl_module.trainer, optimizer), groups)
        rank_zero_info(
            f"{type(self).__name__}: epoch {epoch}, training stages {', '.join(names[first:])} "
            f"({sum(len(g['params']) for g in groups)} parameter tensors joined the optimizer)"
        )

    @staticmethod
    def _param_groups(pl_module: L.LightningModule, optimizer: Optimizer) -> list[dict[str, Any]]:
        build = getattr(pl_module, "optimizer_param_groups", None)
        if callable(build):
            return build()
        params = [p for p in pl_module.parameters() if p.requires_grad]
        return [{"params": params, "lr": nominal_lr(optimizer.param_groups[0])}]

    @staticmethod
    def _schedulers_of(trainer: L.Trainer, optimizer: Optimizer) -> list[Any]:
        return [c.scheduler for c in trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer]

    # -- checkpointing -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "unfrozen_epochs": list(self.unfrozen_epochs)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._resuming = True
        self.unfrozen_epochs = list(state_dict.get("unfrozen_epochs", []))


class FineTune(GradualUnfreezing):
    """fastai's ``fine_tune(freeze_epochs=N)``: train only the last stage (the head) for ``freeze_epochs``
    epochs, then the whole network; discriminative rates come from ``optimizer.layer_decay``. Unlike fastai,
    which restarts a one-cycle schedule at half the lr after unfreezing, the configured schedule simply
    continues (the unfrozen groups join it at its current position).

    Args:
        freeze_epochs: Head-only epochs, ``>= 1``.
        train_bn: See :class:`GradualUnfreezing`.

    Example (YAML, under ``trainer.callbacks``)::

        - class_path: lightning_tricks.callbacks.FineTune
          init_args: {freeze_epochs: 1}
    """

    def __init__(self, freeze_epochs: int = 1, train_bn: bool = True) -> None:
        if isinstance(freeze_epochs, bool) or not isinstance(freeze_epochs, int) or freeze_epochs < 1:
            raise ValueError(
                f"freeze_epochs must be an integer >= 1, got {freeze_epochs!r}; e.g. 1 (fastai's default)"
            )
        super().__init__({freeze_epochs: ALL_STAGES}, train_bn=train_bn)
        self.freeze_epochs = freeze_epochs
