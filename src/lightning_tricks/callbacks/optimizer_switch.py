"""Switch from Adam to SGD during training, at an epoch or when a metric plateaus."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch.optim import SGD, AdamW, Optimizer
from typing_extensions import override

from lightning_tricks.callbacks._lr_scaling import scale_learning_rates
from lightning_tricks.callbacks._monitor import (
    FirstValidationNames,
    known_missing,
    missing_metric_message,
    resolve_mode,
    validation_off_reason,
)
from lightning_tricks.callbacks._plateau import PlateauDetector
from lightning_tricks.callbacks._requirements import require
from lightning_tricks.recipes.optim_wrappers import innermost, rewrap


def adam_equivalent_sgd_lr(optimizer: Optimizer, group: dict[str, Any], momentum: float) -> float | None:
    r"""SGD learning rate that reproduces the current Adam step of one param group.

    Adam moves each weight by ``lr * m_hat / (sqrt(v_hat) + eps)``. The scalar step that best matches
    this along the averaged gradient ``m_hat`` (least squares) is
    ``alpha = lr * sum(m_hat^2 / (sqrt(v_hat) + eps)) / sum(m_hat^2)``: a mean of the per-weight
    effective rates, weighted by ``m_hat^2`` so weights without gradient do not count (an unweighted
    mean would be dominated by ``lr / eps`` for them). SGD with momentum ``mu`` moves by
    ``lr_sgd / (1 - mu)`` times the gradient in steady state, while Adam's ``m`` is normalised, so
    ``lr_sgd = (1 - mu) * alpha``. Returns ``None`` when the group has no Adam state yet.
    """
    beta1, beta2 = (float(b) for b in group["betas"])
    num = torch.zeros((), dtype=torch.float64)
    den = torch.zeros((), dtype=torch.float64)
    for p in group["params"]:
        state = optimizer.state.get(p, {})
        if "exp_avg" not in state or "exp_avg_sq" not in state:
            continue
        step = float(state["step"])
        m_hat = state["exp_avg"].double() / (1 - beta1**step)
        v_hat = state["exp_avg_sq"].double() / (1 - beta2**step)
        m2 = m_hat.pow(2)
        num += (m2 / (v_hat.sqrt() + group["eps"])).sum().cpu()
        den += m2.sum().cpu()
    if den <= 0:
        return None
    return (1.0 - momentum) * float(group["lr"]) * float(num / den)


def warn_decoupled_decay(optimizer: Optimizer) -> None:
    """Warn (once, before training) that a decoupled weight decay kept for SGD changes its meaning."""
    inner = innermost(optimizer)
    decays = sorted(
        {
            group["weight_decay"]
            for group in inner.param_groups
            if group.get("weight_decay") and (group.get("decoupled_weight_decay") or isinstance(inner, AdamW))
        }
    )
    if decays:
        rank_zero_warn(
            f"OptimizerSwitch(weight_decay=None) keeps each group's weight_decay"
            f" ({', '.join(map(str, decays))}), but {type(inner).__name__}'s decoupled decay becomes"
            " SGD's coupled L2 penalty: each step then shrinks the weights by sgd_lr * weight_decay,"
            " usually far more than before. Pass"
            " `weight_decay=` for the SGD phase (e.g. 5e-4, or 0.0 for none)."
        )


class OptimizerSwitch(pl.Callback):
    r"""Train with Adam first, then continue with SGD (the "Adam, then SGD" recipe; Keskar & Socher 2017).

    The switch happens at the start of epoch ``switch_epoch``, or at the start of the epoch after
    ``monitor`` failed to improve for ``patience`` checks (whichever comes first; give at least one).
    The plateau rule is torch's ``ReduceLROnPlateau`` (``threshold=min_delta``, ``threshold_mode="abs"``),
    the one the ``plateau`` LR schedule uses. A ``switch_epoch`` the run never reaches (``>= max_epochs``)
    is warned about on rank 0 before training (a shortened run of a shipped config stays runnable); a
    validation ``monitor`` that is not logged is reported at the first validation (the sanity check
    included).
    The new ``torch.optim.SGD`` keeps the param groups (and any extra keys, e.g. names) and uses per
    group the rate from :func:`adam_equivalent_sgd_lr` (least-squares match of the current Adam step,
    scaled by ``1 - momentum``), or ``sgd_lr`` for every group when given. ``weight_decay=None`` keeps
    each group's value; note that AdamW's decoupled decay then becomes SGD's coupled L2 penalty (a warning
    before training says so).

    Learning-rate schedulers keep running on the new optimizer: each scheduler's ``optimizer`` is
    re-pointed and its ``base_lrs`` (and the groups' ``initial_lr``) are multiplied by
    ``sgd_lr / adam_lr``, so the schedule keeps its shape at the new scale.

    Resume: the callback state records whether and with which rates the switch happened. Lightning
    restores callback state, then builds the user's optimizer, calls ``on_fit_start``, and only then
    loads optimizer and scheduler states; the switch is re-done in ``on_fit_start``, so the SGD state
    of the checkpoint lands in an SGD optimizer. A checkpoint written between the decision and the
    switch holds the Adam state and a pending switch, which happens at the next epoch start as it would
    have. Only a single optimizer is supported. An optimizer wrapped in Lookahead or SAM keeps its
    wrappers around the new SGD (Lookahead's cycle and slow weights restart at the switch).

    Args:
        switch_epoch: epoch at whose start to switch, >= 1, or ``None``.
        monitor: metric whose plateau triggers the switch, or ``None``.
        patience: checks without improvement of ``monitor`` before switching, >= 1.
        mode: ``"auto"`` (from the name of ``monitor``: accuracy-like names ``"max"``, loss-like ``"min"``),
            ``"min"`` or ``"max"``.
        min_delta: minimum improvement of ``monitor``, >= 0.
        momentum: SGD momentum, in ``[0, 1)``.
        nesterov: use Nesterov momentum (needs ``momentum > 0``).
        sgd_lr: fixed SGD learning rate instead of the Adam-derived one, > 0.
        weight_decay: SGD weight decay, >= 0; ``None`` keeps each group's value.

    Attributes:
        switched_epoch: epoch at which SGD took over (-1 before).
        sgd_lrs: learning rate of each param group at the switch.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[OptimizerSwitch(switch_epoch=10, momentum=0.9)])  # doctest: +SKIP
    """

    def __init__(
        self,
        switch_epoch: int | None = None,
        monitor: str | None = None,
        patience: int = 3,
        mode: str = "auto",
        min_delta: float = 0.0,
        momentum: float = 0.9,
        nesterov: bool = False,
        sgd_lr: float | None = None,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__()
        if switch_epoch is None and monitor is None:
            raise ValueError("Give `switch_epoch` or `monitor` (or both); both are None.")
        if switch_epoch is not None and (not isinstance(switch_epoch, int) or switch_epoch < 1):
            raise ValueError(f"`switch_epoch` must be an integer >= 1, got {switch_epoch!r}.")
        if not isinstance(patience, int) or patience < 1:
            raise ValueError(f"`patience` must be an integer >= 1, got {patience!r}.")
        if monitor is None and mode not in ("auto", "min", "max"):
            raise ValueError(f"`mode` must be 'auto', 'min' or 'max', got {mode!r}.")
        if monitor is not None:
            mode = resolve_mode(mode, monitor, type(self).__name__)
        if min_delta < 0:
            raise ValueError(f"`min_delta` must be >= 0, got {min_delta}.")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"`momentum` must be in [0, 1), got {momentum}.")
        if nesterov and momentum == 0:
            raise ValueError("`nesterov=True` needs `momentum` > 0, got momentum=0.")
        if sgd_lr is not None and not sgd_lr > 0:
            raise ValueError(f"`sgd_lr` must be > 0, got {sgd_lr}.")
        if weight_decay is not None and weight_decay < 0:
            raise ValueError(f"`weight_decay` must be >= 0 or None, got {weight_decay}.")
        self.switch_epoch = switch_epoch
        self.monitor = monitor
        self.patience = patience
        self.mode = mode
        self.min_delta = min_delta
        self.momentum = momentum
        self.nesterov = nesterov
        self.sgd_lr = sgd_lr
        self.weight_decay = weight_decay

        self.switched_epoch = -1
        self.sgd_lrs: list[float] = []
        self.lr_ratios: list[float] = []
        self.pending = False
        self.plateau = None if monitor is None else PlateauDetector(mode, patience, min_delta)
        self._first_names = FirstValidationNames()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(switch_epoch=self.switch_epoch, monitor=self.monitor)

    @property
    def switched(self) -> bool:
        return self.switched_epoch >= 0

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "switched_epoch": self.switched_epoch,
            "sgd_lrs": list(self.sgd_lrs),
            "lr_ratios": list(self.lr_ratios),
            "pending": self.pending,
            "plateau": None if self.plateau is None else self.plateau.state_dict(),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.switched_epoch = state_dict.get("switched_epoch", -1)
        self.sgd_lrs = list(state_dict.get("sgd_lrs", []))
        self.lr_ratios = list(state_dict.get("lr_ratios", []))
        self.pending = state_dict.get("pending", False)
        if self.plateau is not None and state_dict.get("plateau") is not None:
            self.plateau.load_state_dict(state_dict["plateau"])

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        max_epochs = trainer.max_epochs
        if stage != TrainerFn.FITTING or self.switch_epoch is None or max_epochs is None or max_epochs < 0:
            return
        if trainer.fast_dev_run:  # its one epoch reaches no switch_epoch (>= 1) by design
            return
        if self.switch_epoch >= max_epochs and not self.switched:
            trigger = (
                "no switch happens"
                if self.monitor is None
                else f"only a plateau of `{self.monitor}` can switch"
            )
            rank_zero_warn(
                f"OptimizerSwitch(switch_epoch={self.switch_epoch}) is never reached in a run of"
                f" `max_epochs={max_epochs}` (epochs 0-{max_epochs - 1}), so {trigger}. Set `switch_epoch` to"
                f" at most {max_epochs - 1}, or raise `trainer.max_epochs` above {self.switch_epoch}."
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        require(
            "OptimizerSwitch",
            trainer,
            pl_module,
            why="it replaces the one optimizer by SGD mid-run",
            single_optimizer=True,
        )
        if not self.switched and self.weight_decay is None:
            warn_decoupled_decay(trainer.optimizers[0])
        if self.switched and not isinstance(innermost(trainer.optimizers[0]), SGD):
            # resuming after the switch: rebuild SGD before Lightning loads the optimizer state
            self._install_sgd(trainer, self.sgd_lrs, self.lr_ratios)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.switched:
            return
        due = self.switch_epoch is not None and trainer.current_epoch >= self.switch_epoch
        if due or self.pending:
            self._switch(trainer)

    @property
    def best(self) -> float | None:
        """Best value of ``monitor`` so far (``None`` without a monitor)."""
        return None if self.plateau is None else self.plateau.best

    @property
    def wait_count(self) -> int:
        """Checks of ``monitor`` since its last improvement."""
        return 0 if self.plateau is None else self.plateau.wait_count

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        watching = self.plateau is not None and not self.switched
        if watching and (reason := validation_off_reason(trainer, pl_module)) is not None:
            # The plateau rule reads `monitor` after each validation: without one it would never fire.
            raise ValueError(
                f"OptimizerSwitch(monitor={self.monitor!r}) checks for a plateau after each validation, but"
                f" this run never validates: {reason}. Validate (a `validation_step` that logs"
                f" {self.monitor!r}, and validation data), or set `monitor=None` to switch at `switch_epoch`"
                " only."
            )
        self._check_names(trainer, self._first_names.at_train_start())

    def _check_names(self, trainer: pl.Trainer, names: dict[str, None] | None) -> None:
        # a validation metric absent after the first validation (sanity check included) is a wrong name
        if names is None or self.plateau is None:
            return
        if trainer.strategy.reduce_boolean_decision(known_missing(self.monitor, names), all=False):
            raise RuntimeError(missing_metric_message("OptimizerSwitch", "monitor", self.monitor, names))

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.plateau is None or self.switched or trainer.state.fn != TrainerFn.FITTING:
            return
        self._check_names(trainer, self._first_names.at_validation_end(trainer))
        metrics = trainer.callback_metrics
        if trainer.sanity_checking:
            return
        if self.monitor not in metrics:
            raise RuntimeError(missing_metric_message("OptimizerSwitch", "monitor", self.monitor, metrics))
        current = trainer.strategy.reduce(metrics[self.monitor].detach().float().clone(), reduce_op="mean")
        # every rank holds the same mean, so every rank's detector decides the same
        self.pending = self.plateau.update(float(current)) or self.pending

    def _switch(self, trainer: pl.Trainer) -> None:
        adam = trainer.optimizers[0]
        lrs = []
        for group in adam.param_groups:
            lr = self.sgd_lr
            if lr is None:
                if "betas" not in group or "always_adapt" in group:  # LAMB: trust ratios, not Adam's step
                    raise ValueError(
                        f"OptimizerSwitch derives the SGD rate from Adam state, but the optimizer is"
                        f" {type(innermost(adam)).__name__}; pass `sgd_lr`."
                    )
                lr = adam_equivalent_sgd_lr(adam, group, self.momentum)
                if lr is None:
                    raise ValueError(
                        "OptimizerSwitch found no Adam state to derive the SGD rate from; switch later or"
                        " pass `sgd_lr`."
                    )
            lrs.append(float(lr))
        # all ranks must use the same rates
        lrs = trainer.strategy.broadcast(lrs, src=0)
        ratios = [
            lr / float(g["lr"]) if g["lr"] else 1.0 for lr, g in zip(lrs, adam.param_groups, strict=True)
        ]
        self._install_sgd(trainer, lrs, ratios)
        self.sgd_lrs, self.lr_ratios = lrs, ratios
        self.switched_epoch = trainer.current_epoch
        self.pending = False
        rank_zero_info(
            f"OptimizerSwitch: {type(innermost(adam)).__name__} -> SGD(momentum={self.momentum},"
            f" nesterov={self.nesterov})"
            f" at epoch {trainer.current_epoch} with lr {', '.join(f'{lr:.3g}' for lr in lrs)}."
        )

    def _install_sgd(self, trainer: pl.Trainer, lrs: list[float], ratios: list[float]) -> None:
        old = trainer.optimizers[0]
        groups = []
        for group, lr in zip(old.param_groups, lrs, strict=True):
            new = {k: v for k, v in group.items() if k not in old.defaults}
            wd = group.get("weight_decay", 0.0) if self.weight_decay is None else self.weight_decay
            new.update(lr=lr, momentum=self.momentum, nesterov=self.nesterov, weight_decay=wd)
            groups.append(new)
        # Wrappers (Lookahead, SAM) stay around the new SGD; a Lookahead starts a new cycle here.
        sgd = rewrap(old, SGD(groups, lr=lrs[0], momentum=self.momentum, nesterov=self.nesterov))
        schedulers = [cfg.scheduler for cfg in trainer.lr_scheduler_configs if cfg.scheduler.optimizer is old]
        for scheduler in schedulers:
            scheduler.optimizer = sgd
        # `lr` is set above; the schedule's own values (initial/peak/base/last rates) follow by the same ratio
        scale_learning_rates(sgd, schedulers, ratios, group_keys=("initial_lr", "max_lr", "min_lr"))
        trainer.strategy.optimizers = [sgd]
