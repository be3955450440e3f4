"""Exponential moving average (Polyak averaging) of the weights, validated side by side with the raw weights.

:class:`EMA` extends Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` (the base of
:class:`~lightning.pytorch.callbacks.EMAWeightAveraging`) and keeps its swap and checkpoint layout.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.types import STEP_OUTPUT
from typing_extensions import override

from lightning_tricks._io import atomic_save
from lightning_tricks.callbacks._averaging import WARMUPS, TensorListEMA, ema_decay
from lightning_tricks.evaluation import evaluate_weights

CHECKPOINT_WEIGHTS = ("auto", "ema", "raw")
# A checkpoint's `state_dict` is labelled with the weights it holds: "raw" or an EMA's `weights_name`.
WEIGHTS_LABEL_KEY = "state_dict_weights"


class EMA(WeightAveraging):
    r"""Exponential moving average of a model's weights, ``ema = decay * ema + (1 - decay) * w``.

    After every ``update_every_n_steps``-th optimizer step from ``start_step`` on (zero-based step
    indices), the average moves towards the live weights. The first update copies the live weights,
    later ones use ``decay``, warmed up by default so early averages are not dominated by the
    initial weights:

    - ``warmup="num_updates"`` (the default; TensorFlow's ``ExponentialMovingAverage(num_updates)``
      and torch-ema): ``min(decay, (1 + t) / (10 + t))``;
    - ``warmup="power"`` (timm ``ModelEmaV3``): ``min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)``;
    - ``warmup="progress"`` (airbench): ``decay * progress ** warmup_power``, ``progress`` the fraction
      of the run's optimizer steps done (``trainer.estimated_stepping_batches``): weak averaging early,
      strong at the end;
    - ``warmup=None``: ``decay`` from the second update on (Lightning's ``EMAWeightAveraging``);

    where ``t`` is the number of updates already applied (counted in updates, not optimizer steps).
    ``"num_updates"`` is the default because it has no parameter of its own and reaches the
    configured decay after about ``9 / (1 - decay)`` updates (``power`` with 2/3 needs about
    ``(1 - decay) ** -1.5``: 31,600 instead of 9,000 updates for 0.999), so in a run long enough
    for ``decay`` the configured value is what runs, while in a short one the average follows the
    last ~10% of the updates instead of the initial weights.

    **Horizon check.** Before training, a rank-0 warning is raised when the EMA horizon
    ``1 / (1 - decay)`` exceeds :attr:`HORIZON_FRACTION` (10%) of the planned updates
    (``trainer.estimated_stepping_batches`` from ``start_step``, every ``update_every_n_steps``):
    without warm-up the initial weights then still weigh ``decay ** updates`` in the final average,
    with warm-up ``decay`` is never reached. The message names the decay, the planned updates and
    the largest decay that fits.

    **Lookahead** (``lookahead=w``, Zhang et al. 2019's Lookahead in EMA form, as airbench trains): after
    each update the live weights are pulled towards the average, ``live = live + w * (average - live)``
    for every averaged tensor (parameters, and float buffers when ``average_buffers``); ``w = 1`` copies
    the average into the live weights. airbench94's rule is ``EMA(decay=0.95 ** 5, warmup="progress",
    warmup_power=3, update_every_n_steps=5, start_step=4, lookahead=1.0)``: every 5th step
    ``average = lerp(average, live, 1 - 0.95 ** 5 * (step / total) ** 3)``, then ``live = average``
    (airbench starts its average from the initial weights, this callback from the first update's live
    weights, a difference of ``(5 / total) ** 3`` in the first decay). The optimizer keeps its state
    (momentum), as in airbench. The pulled weights are the live weights, so checkpoints and a resume
    carry them as they do the raw weights.

    **Validation of both weights.** Each validation epoch first runs as usual on the *raw* weights
    (so ``val/acc`` keeps its meaning for :class:`~lightning.pytorch.callbacks.ModelCheckpoint`,
    :class:`~lightning.pytorch.callbacks.EarlyStopping` and LR schedulers), then, in this callback's
    ``on_validation_epoch_end``, the EMA weights are swapped in and the validation dataloaders are
    run a second time through ``trainer.strategy.batch_to_device`` (so DataModule batch transforms
    apply) and ``trainer.strategy.validation_step`` (so precision and DDP wrapping apply). During
    that pass every ``self.log(name, ...)`` of the module is re-keyed to ``name + suffix``
    (``val/acc_ema``), logged at epoch level, and torchmetrics ``Metric``/``MetricCollection``
    attributes are temporarily replaced by fresh clones, so the raw metric state is never mixed with
    the EMA one. Both ``val/acc`` and ``val/acc_ema`` can be monitored. The pass runs under
    :func:`~lightning.pytorch.utilities.seed.isolate_rng`, so the training RNG stream (shuffling,
    dropout) is the same as without the callback. Only ``validation_step`` runs in the second pass:
    values that a module accumulates itself and logs from its own ``on_validation_epoch_end`` get no
    ``_ema`` twin. Before the first update (``start_step`` not reached) the EMA model is the raw
    model: nothing is swapped in (unlike Lightning issue #21724, where the never-updated initial
    weights get validated) and the ``_ema`` metrics equal the raw ones, so a ``ModelCheckpoint``
    or ``EarlyStopping`` monitoring ``val/acc_ema`` always finds its key. The live weights are swapped back
    bit-identically, also when the pass raises.

    **Checkpoints: the weights a checkpoint is chosen on are the weights it holds.** A
    ``ModelCheckpoint`` monitoring an EMA metric (a name with this callback's ``suffix``, such as
    ``val/acc_ema``, ``val/loss_ema_smoothed``) stores the EMA weights in ``checkpoint["state_dict"]``;
    one monitoring a raw metric (``val/acc``) stores the raw weights there. The other weights are
    kept beside them, so every checkpoint holds both, labelled:

    - ``checkpoint["state_dict_weights"]``: ``"raw"`` or this callback's :attr:`weights_name`
      (``"ema"`` for ``suffix="_ema"``), the weights in ``checkpoint["state_dict"]``;
    - EMA in ``state_dict``: the raw weights in ``checkpoint["current_model_state"]``
      (``WeightAveraging``'s layout);
    - raw in ``state_dict``: the EMA weights in ``checkpoint["state_dict_ema"]``
      (``"state_dict_" + weights_name``), loadable with ``model.load_state_dict``.

    ``checkpoint_weights="auto"`` (default) applies that rule, and with no monitored checkpoint
    (e.g. only ``save_last``) puts the EMA weights in ``state_dict`` (the averaged model is the
    product, as in ``WeightAveraging``). ``ModelCheckpoint`` callbacks that monitor raw and EMA
    metrics at once are refused before training: set ``checkpoint_weights="ema"`` or ``"raw"``.
    With several ``EMA`` instances one at most holds ``state_dict``. ``trainer.test(ckpt_path=...)``
    and inference load ``checkpoint["state_dict"]``, i.e. the weights the checkpoint was chosen on.
    Resuming ``fit`` restores both from either layout. Before the first update the EMA equals the
    raw weights. ``ModelCheckpoint(save_weights_only=True)`` skips callback hooks, so such files
    hold the raw weights only: monitoring an EMA metric with it is refused before training.

    At the end of ``fit`` the average is copied into the model when ``copy_average_at_end`` is true
    (Lightning's behaviour); which weights the model finally holds when other callbacks also choose
    weights is decided in :mod:`lightning_tricks.callbacks.final_weights`.
    :meth:`ema_state_dict` and :meth:`save_ema_weights` export the average explicitly.

    **DDP.** Parameters are identical on every rank after each optimizer step, so the averages stay
    identical with no communication. BatchNorm running statistics differ between ranks unless
    ``sync_batchnorm=True``; checkpoints are written from rank 0.

    **Which averaging to use.** Lightning's :class:`~lightning.pytorch.callbacks.StochasticWeightAveraging`
    is an *equal-weight* average over the last epochs with its own SWA learning rate schedule and a
    BatchNorm recomputation: use it for a final flat-region average at the end of training. Lightning's
    :class:`~lightning.pytorch.callbacks.EMAWeightAveraging` is this same EMA without warm-up that
    validates (and logs) only the averaged weights and swaps even before its first update. Use
    ``EMA`` when you want the EMA and the raw model compared every epoch, a warm-up, a delayed start
    or the average kept on the CPU.

    Args:
        decay: EMA decay in ``(0, 1)``; ``0.999`` averages roughly the last 1000 updates.
        warmup: ``None``, ``"num_updates"``, ``"power"`` or ``"progress"`` (see above).
        warmup_gamma: ``gamma > 0`` of the ``"power"`` warm-up.
        warmup_power: ``power > 0`` of the ``"power"`` warm-up (timm uses 2/3, or 3/4 for short runs) and
            of the ``"progress"`` schedule (airbench: 3).
        update_every_n_steps: update after every n-th optimizer step, ``n >= 1``.
        start_step: zero-based optimizer step of the first update, ``>= 0``.
        average_buffers: average floating-point buffers (BatchNorm statistics) too; if ``False`` they
            are copied from the live model at each update.
        device: where the average lives: ``None`` (the module's device) or e.g. ``"cpu"`` to save
            accelerator memory.
        validate: run the second validation pass on the EMA weights.
        suffix: appended to every metric name logged in the EMA pass.
        copy_average_at_end: copy the EMA into the model when ``fit`` ends.
        checkpoint_weights: which weights ``checkpoint["state_dict"]`` holds: ``"auto"`` (those the
            checkpoint's monitor measures, see above), ``"ema"`` or ``"raw"``.
        lookahead: ``None`` (off) or the pull ``w`` in ``(0, 1]`` of the live weights towards the average
            after each update (see above).

    Example::

        from lightning_tricks.callbacks.ema import EMA

        ema = EMA(decay=0.999)  # warm-up "num_updates" by default
        best = ModelCheckpoint(monitor="val/acc_ema", mode="max")  # stores the EMA weights
        trainer = Trainer(max_epochs=30, callbacks=[ema, best])
        trainer.fit(model, datamodule=dm)   # logs val/acc and val/acc_ema every epoch
        ema_weights = ema.ema_state_dict()
    """

    HORIZON_FRACTION = 0.1
    """Largest share of the planned updates the horizon ``1 / (1 - decay)`` may take without a warning."""

    def __init__(
        self,
        decay: float = 0.999,
        warmup: str | None = "num_updates",
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        average_buffers: bool = True,
        device: str | torch.device | int | None = None,
        validate: bool = True,
        suffix: str = "_ema",
        copy_average_at_end: bool = True,
        checkpoint_weights: str = "auto",
        lookahead: float | None = None,
    ) -> None:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 < decay < 1.0:
            raise ValueError(f"`decay` must be a float in (0, 1), got {decay!r}.")
        if warmup is not None and warmup not in WARMUPS:
            raise ValueError(f"`warmup` must be None or one of {WARMUPS}, got {warmup!r}.")
        if not warmup_gamma > 0:
            raise ValueError(f"`warmup_gamma` must be > 0, got {warmup_gamma!r}.")
        if not warmup_power > 0:
            raise ValueError(f"`warmup_power` must be > 0, got {warmup_power!r}.")
        if isinstance(update_every_n_steps, bool) or not isinstance(update_every_n_steps, int):
            raise ValueError(f"`update_every_n_steps` must be an int >= 1, got {update_every_n_steps!r}.")
        if update_every_n_steps < 1:
            raise ValueError(f"`update_every_n_steps` must be an int >= 1, got {update_every_n_steps!r}.")
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"`start_step` must be an int >= 0, got {start_step!r}.")
        if not isinstance(suffix, str) or not suffix.strip("_"):
            raise ValueError(f"`suffix` must be a non-empty string such as '_ema', got {suffix!r}.")
        if checkpoint_weights not in CHECKPOINT_WEIGHTS:
            raise ValueError(
                f"`checkpoint_weights` must be one of {CHECKPOINT_WEIGHTS}, got {checkpoint_weights!r}."
            )
        if lookahead is not None and (
            isinstance(lookahead, bool) or not isinstance(lookahead, (int, float)) or not 0 < lookahead <= 1
        ):
            raise ValueError(
                f"`lookahead` must be None (off) or a float in (0, 1] (1.0 copies the average into the live "
                f"weights), got {lookahead!r}."
            )
        super().__init__(device=_parse_device(device), use_buffers=bool(average_buffers))
        self.decay = float(decay)
        self.warmup = warmup
        self.warmup_gamma = float(warmup_gamma)
        self.warmup_power = float(warmup_power)
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.average_buffers = bool(average_buffers)
        self.validate = bool(validate)
        self.suffix = suffix
        self.copy_average_at_end = bool(copy_average_at_end)
        self.checkpoint_weights = checkpoint_weights
        self.lookahead = None if lookahead is None else float(lookahead)
        self._progress = 0.0  # fraction of the run's optimizer steps done, for warmup="progress"
        self._holds_state_dict = True
        self._num_updates = 0
        self._ema: TensorListEMA | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            decay=self.decay,
            warmup=self.warmup,
            update_every_n_steps=self.update_every_n_steps,
            start_step=self.start_step,
            suffix=self.suffix,
        )

    @property
    def weights_name(self) -> str:
        """Name of the EMA weights in checkpoints: the ``suffix`` without underscores (``"ema"``)."""
        return self.suffix.strip("_")

    @property
    def holds_state_dict(self) -> bool:
        """Whether this ``fit``'s checkpoints hold the EMA weights in ``state_dict`` (set in ``setup``)."""
        return self._holds_state_dict

    def measures(self, metric: str) -> bool:
        """Whether ``metric`` was measured on these EMA weights (``val/acc_ema``, ``val/loss_ema_smoothed``).

        Example::

            >>> EMA(suffix="_ema").measures("val/acc_ema"), EMA(suffix="_ema").measures("val/acc")
            (True, False)
        """
        return re.search(re.escape(self.suffix) + r"($|/|_smoothed$)", metric) is not None

    @property
    def num_updates(self) -> int:
        """Number of EMA updates applied so far (0: the average does not exist yet)."""
        return self._num_updates

    def current_decay(self) -> float:
        """Decay the next update will use."""
        return ema_decay(
            self.decay, self._num_updates, self.warmup, self.warmup_gamma, self.warmup_power, self._progress
        )

    @override
    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Update after zero-based step ``start_step`` and every ``update_every_n_steps`` after it."""
        if step_idx is None:
            return False
        return step_idx >= self.start_step and (step_idx - self.start_step) % self.update_every_n_steps == 0

    # ------------------------------------------------------------------ setup

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == TrainerFn.FITTING:
            emas = [cb for cb in trainer.callbacks if isinstance(cb, EMA)]
            suffixes = [cb.suffix for cb in emas]
            if len(suffixes) != len(set(suffixes)):
                raise ValueError(
                    f"Each EMA callback needs its own `suffix`, got {suffixes}; e.g. EMA(suffix='_ema_0.99')."
                )
            self._holds_state_dict = _state_dict_owner(emas, trainer.checkpoint_callbacks) is self
            # Imported here: final_weights knows every callback that writes weights, this one included.
            from lightning_tricks.callbacks.final_weights import check_final_weights

            check_final_weights(trainer, self)
            self._ema = None
            self._num_updates = 0
        super().setup(trainer, pl_module, stage)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The strategy has moved the module by now (it was still on the CPU in `setup`).
        assert self._average_model is not None
        if self._device is None:
            self._average_model.to(pl_module.device)
        self._ema = self._build_ema(pl_module)
        if not trainer.fast_dev_run:  # a smoke run of a batch or a few is shorter than any horizon
            self._check_horizon(trainer.estimated_stepping_batches)

    def planned_updates(self, optimizer_steps: float) -> float:
        """Number of updates in a run of ``optimizer_steps`` steps (``inf`` for an unbounded run)."""
        if not math.isfinite(optimizer_steps):
            return math.inf
        return max(0, math.ceil((int(optimizer_steps) - self.start_step) / self.update_every_n_steps))

    def _check_horizon(self, optimizer_steps: float) -> None:
        planned = self.planned_updates(optimizer_steps)
        if not math.isfinite(planned):
            return
        if planned == 0:
            rank_zero_warn(
                f"EMA(start_step={self.start_step}) never updates in this run of {int(optimizer_steps)} "
                "optimizer steps, so the model keeps its raw weights. Lower `start_step`."
            )
            return
        horizon = 1.0 / (1.0 - self.decay)
        if horizon <= self.HORIZON_FRACTION * planned:
            return
        fitting = self.HORIZON_FRACTION * planned  # the longest horizon that fits
        fixes = [] if self.warmup is not None else ["warmup='num_updates'"]
        if fitting >= 2:
            fixes.append(f"a smaller decay such as EMA(decay={math.floor((1 - 1 / fitting) * 1e4) / 1e4})")
        fixes.append("a longer run")
        if self.warmup is None:
            consequence = (
                f"Without warm-up the first update (near the initial weights) still makes up "
                f"{100 * self.decay ** (planned - 1):.2g}% of the final average."
            )
        else:
            reached = ema_decay(self.decay, planned - 1, self.warmup, self.warmup_gamma, self.warmup_power)
            consequence = (
                f"The {self.warmup!r} warm-up keeps the decay at or below {reached:.4g} up to the last "
                f"update, so decay={self.decay} never takes effect."
            )
        rank_zero_warn(
            f"EMA(decay={self.decay}) averages over about 1/(1-decay) = {horizon:.0f} updates, more than "
            f"{self.HORIZON_FRACTION:.0%} of the {planned} updates this run plans ({int(optimizer_steps)} "
            f"optimizer steps, start_step={self.start_step}, "
            f"update_every_n_steps={self.update_every_n_steps}). {consequence} Fix: {', or '.join(fixes)}."
        )

    def _build_ema(self, pl_module: pl.LightningModule) -> TensorListEMA:
        assert self._average_model is not None
        average, live, averaged = [], [], []
        for source, is_avg in (("named_parameters", True), ("named_buffers", self.average_buffers)):
            ours = list(getattr(self._average_model.module, source)())
            theirs = list(getattr(pl_module, source)())
            if [n for n, _ in ours] != [n for n, _ in theirs]:
                raise RuntimeError("The module's parameters or buffers changed after the EMA copy was made.")
            average += [t for _, t in ours]
            live += [t for _, t in theirs]
            averaged += [is_avg] * len(ours)
        return TensorListEMA(average, live, averaged)

    # ----------------------------------------------------------------- update

    def _update(self, pl_module: pl.LightningModule) -> None:
        if self._ema is None:
            self._ema = self._build_ema(pl_module)
        self._ema.update(self.current_decay())
        self._num_updates += 1
        if self.lookahead is not None:
            self._ema.pull_live(self.lookahead)

    @override
    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: STEP_OUTPUT,
        batch: Any,
        batch_idx: int,
    ) -> None:
        # global_step counts optimizer steps, so gradient accumulation updates once per step.
        if trainer.global_step > self._latest_update_step and self.should_update(
            step_idx=trainer.global_step - 1
        ):
            total = trainer.estimated_stepping_batches
            self._progress = trainer.global_step / total if math.isfinite(total) and total > 0 else 1.0
            self._update(pl_module)
            self._latest_update_step = trainer.global_step

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Subclasses may return True for epochs; route those through the same EMA update.
        if trainer.current_epoch > self._latest_update_epoch and self.should_update(
            epoch_idx=trainer.current_epoch
        ):
            self._update(pl_module)
            self._latest_update_epoch = trainer.current_epoch

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        from lightning_tricks.callbacks.final_weights import pending_restore

        if self._ema is None or not self.copy_average_at_end or pending_restore(trainer) is not None:
            # Restored best weights win over the average (see final_weights), whatever the callback order.
            return
        if self._num_updates == 0:
            rank_zero_warn(
                f"EMA never updated (start_step={self.start_step} was not reached); "
                "the model keeps its raw weights."
            )
            return
        self._ema.copy_average_to_live()

    # ------------------------------------------------------------- validation

    @override
    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The normal validation runs on the raw weights (no swap, unlike ``WeightAveraging``)."""

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Runs the validation dataloaders again with the EMA weights, logging ``name + suffix``."""
        # Also in the sanity check (nothing to swap yet), so monitors of `val/acc_ema` find it from the start.
        if not self.validate or self._ema is None or trainer.state.fn != TrainerFn.FITTING:
            return
        # Before the first update the EMA model *is* the raw model (as in checkpoints): no swap, and
        # the `_ema` metrics equal the raw ones, so monitors of `val/acc_ema` find their key.
        swap = self.swapped() if self._num_updates > 0 else nullcontext()
        with swap:
            evaluate_weights(trainer, pl_module, "val", self.suffix)

    @contextmanager
    def swapped(self) -> Iterator[None]:
        """Context manager with the EMA weights in the model; the live weights come back bit-identical.

        Example::

            with ema.swapped():
                logits = model(x)   # EMA weights
        """
        if self._ema is None or self._num_updates == 0:
            raise RuntimeError("The EMA has no average yet: it is created by the first update during `fit`.")
        with self._ema.average_in_live():
            yield

    # ----------------------------------------------------------------- export

    def ema_state_dict(self) -> dict[str, torch.Tensor]:
        """The EMA weights as a copy of the module's ``state_dict`` (same keys), loadable with
        ``model.load_state_dict``.

        Example::

            model.load_state_dict(ema.ema_state_dict())
        """
        if self._average_model is None or self._num_updates == 0:
            raise RuntimeError(
                "The EMA has no average yet: it is created by the first update during `fit` "
                f"(start_step={self.start_step})."
            )
        return {k: v.detach().clone() for k, v in self._average_model.module.state_dict().items()}

    @rank_zero_only
    def save_ema_weights(self, path: str | Path) -> None:
        """Saves :meth:`ema_state_dict` with ``torch.save``, atomically (rank 0 only).

        Example::

            ema.save_ema_weights("ema.pt")
            model.load_state_dict(torch.load("ema.pt", weights_only=True))
        """
        atomic_save(self.ema_state_dict(), path)

    # ------------------------------------------------------------ checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "latest_update_step": self._latest_update_step,
            "latest_update_epoch": self._latest_update_epoch,
            "num_updates": self._num_updates,
            "lookahead": self.lookahead,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = int(state_dict.get("latest_update_step", 0))
        self._latest_update_epoch = int(state_dict.get("latest_update_epoch", -1))
        self._num_updates = int(state_dict.get("num_updates", self._num_updates))
        saved = state_dict.get("lookahead")
        if saved != self.lookahead:
            rank_zero_warn(
                f"EMA(suffix={self.suffix!r}): the checkpoint was trained with lookahead={saved}, this run "
                f"uses lookahead={self.lookahead}; the resumed run differs from an uninterrupted one."
            )

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None:
            return
        self._average_model.n_averaged.fill_(self._num_updates)
        if self._num_updates == 0:
            # Never-updated average: save the raw weights as "the EMA" rather than the initial ones.
            if self._ema is None:
                self._ema = self._build_ema(pl_module)
            self._ema.copy_live_to_average()
        if self._holds_state_dict:
            super().on_save_checkpoint(trainer, pl_module, checkpoint)
            checkpoint[WEIGHTS_LABEL_KEY] = self.weights_name
        else:
            checkpoint[f"state_dict_{self.weights_name}"] = {
                k: v.detach().clone() for k, v in self._average_model.module.state_dict().items()
            }
            checkpoint.setdefault(WEIGHTS_LABEL_KEY, "raw")

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None or trainer.state.fn != TrainerFn.FITTING:
            # Outside fit the model keeps checkpoint["state_dict"]: the weights it was chosen on.
            return
        # Follow the checkpoint's layout, which may differ from this run's choice.
        beside = checkpoint.get(f"state_dict_{self.weights_name}")
        if beside is not None:
            self._average_model.module.load_state_dict(beside)
        elif checkpoint.get(WEIGHTS_LABEL_KEY, self.weights_name) == self.weights_name:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
        else:
            raise RuntimeError(
                f"The checkpoint holds no weights of EMA(suffix={self.suffix!r}) (its state_dict holds "
                f"{checkpoint[WEIGHTS_LABEL_KEY]!r} weights); resume with the callbacks it was written with."
            )


def _state_dict_owner(emas: list[EMA], checkpoint_callbacks: list[Any]) -> EMA | None:
    """The EMA whose weights go into ``checkpoint["state_dict"]``, or ``None`` for the raw weights.

    A monitored ``ModelCheckpoint`` stores the weights its monitor measures; without one the first
    EMA (or the one with ``checkpoint_weights="ema"``) does. Conflicts are refused here, before training.
    """
    monitored = [cb for cb in checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.monitor]
    measured_by = {cb.monitor: next((e for e in emas if e.measures(cb.monitor)), None) for cb in monitored}
    for cb in monitored:
        ema = measured_by[cb.monitor]
        if ema is not None and cb.save_weights_only:
            raise ValueError(
                f"ModelCheckpoint(monitor={cb.monitor!r}, save_weights_only=True) would store the raw "
                "weights (weights-only checkpoints skip callback hooks) though it is chosen on the EMA "
                "weights. Set save_weights_only=False, or monitor the raw metric and export the EMA "
                "with EMA.save_ema_weights()."
            )
    explicit = [e for e in emas if e.checkpoint_weights == "ema"]
    if len(explicit) > 1:
        raise ValueError(
            f"Only one EMA can hold checkpoint['state_dict']; checkpoint_weights='ema' is set on suffixes "
            f"{[e.suffix for e in explicit]}. Set checkpoint_weights='auto' or 'raw' on the others."
        )
    if explicit:
        return explicit[0]
    auto = [e for e in emas if e.checkpoint_weights == "auto"]
    if not monitored:
        return auto[0] if auto else None
    chosen = set(measured_by.values())
    if len(chosen) > 1:
        names = {m: "raw" if e is None else e.weights_name for m, e in measured_by.items()}
        raise ValueError(
            "ModelCheckpoint callbacks monitor metrics of different weights "
            f"({', '.join(f'{m!r}: {w}' for m, w in names.items())}), but checkpoint['state_dict'] holds one "
            "set: monitor metrics of one set, or choose with EMA(checkpoint_weights='ema' or 'raw'); the "
            "other weights are stored beside them either way."
        )
    owner = chosen.pop()
    return owner if owner is not None and owner.checkpoint_weights == "auto" else None


def _parse_device(device: str | torch.device | int | None) -> str | torch.device | int | None:
    if device is None:
        return None
    allowed = "None, 'cpu', 'cuda', 'cuda:N', an int GPU index or a torch.device"
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise ValueError(f"`device` must be {allowed}, got {device!r}.")
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"`device` must be {allowed}, got {device!r}.") from err
    if parsed.type == "meta":
        raise ValueError(f"`device` must be {allowed}, got {device!r} (meta tensors hold no values).")
    return device
