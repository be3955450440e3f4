"""Exponential moving average (Polyak averaging) of the weights, validated side by side with the raw weights.

:class:`EMA` extends Lightning's :class:`~lightning.pytorch.callbacks.WeightAveraging` (the base of
:class:`~lightning.pytorch.callbacks.EMAWeightAveraging`) and keeps its swap and checkpoint layout.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from lightning.pytorch.utilities.types import STEP_OUTPUT
from torch import nn
from torchmetrics import Metric, MetricCollection
from typing_extensions import override

from lightning_tricks.callbacks._averaging import WARMUPS, TensorListEMA, ema_decay


class EMA(WeightAveraging):
    r"""Exponential moving average of a model's weights, ``ema = decay * ema + (1 - decay) * w``.

    After every ``update_every_n_steps``-th optimizer step from ``start_step`` on (zero-based step
    indices), the average moves towards the live weights. The first update copies the live weights,
    later ones use ``decay``, optionally warmed up so early averages are not dominated by the
    initial weights:

    - ``warmup="num_updates"`` (torch-ema): ``min(decay, (1 + t) / (10 + t))``;
    - ``warmup="power"`` (timm ``ModelEmaV3``): ``min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)``;

    where ``t`` is the number of updates already applied (counted in updates, not optimizer steps).

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

    **Checkpoints.** The layout is ``WeightAveraging``'s: ``checkpoint["state_dict"]`` holds the
    EMA weights (so a checkpoint loaded for inference *is* the EMA model), the raw weights sit in
    ``checkpoint["current_model_state"]``, and resuming ``fit`` restores both. Before the first
    update the checkpoint holds the raw weights in both places. With two ``EMA`` instances (distinct
    ``suffix``), the first one found uses that layout and the others keep their averages in their
    own callback state. At the end of ``fit`` the average is copied into the model when
    ``copy_average_at_end`` is true (Lightning's behaviour, so ``trainer.test`` after ``fit``
    evaluates the EMA); :meth:`ema_state_dict` and :meth:`save_ema_weights` export it explicitly.
    ``ModelCheckpoint(save_weights_only=True)`` skips callback hooks, so such files hold the raw weights.

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
        warmup: ``None``, ``"num_updates"`` or ``"power"`` (see above).
        warmup_gamma: ``gamma > 0`` of the ``"power"`` warm-up.
        warmup_power: ``power > 0`` of the ``"power"`` warm-up (timm uses 2/3, or 3/4 for short runs).
        update_every_n_steps: update after every n-th optimizer step, ``n >= 1``.
        start_step: zero-based optimizer step of the first update, ``>= 0``.
        average_buffers: average floating-point buffers (BatchNorm statistics) too; if ``False`` they
            are copied from the live model at each update.
        device: where the average lives: ``None`` (the module's device) or e.g. ``"cpu"`` to save
            accelerator memory.
        validate: run the second validation pass on the EMA weights.
        suffix: appended to every metric name logged in the EMA pass.
        copy_average_at_end: copy the EMA into the model when ``fit`` ends.

    Example::

        from lightning_tricks.callbacks.ema import EMA

        ema = EMA(decay=0.999, warmup="num_updates")
        best = ModelCheckpoint(monitor="val/acc_ema", mode="max")
        trainer = Trainer(max_epochs=30, callbacks=[ema, best])
        trainer.fit(model, datamodule=dm)   # logs val/acc and val/acc_ema every epoch
        ema_weights = ema.ema_state_dict()
    """

    def __init__(
        self,
        decay: float = 0.999,
        warmup: str | None = None,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        average_buffers: bool = True,
        device: str | torch.device | int | None = None,
        validate: bool = True,
        suffix: str = "_ema",
        copy_average_at_end: bool = True,
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
        if not isinstance(suffix, str) or not suffix:
            raise ValueError(f"`suffix` must be a non-empty string such as '_ema', got {suffix!r}.")
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
    def num_updates(self) -> int:
        """Number of EMA updates applied so far (0: the average does not exist yet)."""
        return self._num_updates

    def current_decay(self) -> float:
        """Decay the next update will use."""
        return ema_decay(self.decay, self._num_updates, self.warmup, self.warmup_gamma, self.warmup_power)

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
            suffixes = [cb.suffix for cb in trainer.callbacks if isinstance(cb, EMA)]
            if len(suffixes) != len(set(suffixes)):
                raise MisconfigurationException(
                    f"Each EMA callback needs its own `suffix`, got {suffixes}; e.g. EMA(suffix='_ema_0.99')."
                )
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
        if self._ema is None or not self.copy_average_at_end:
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
        if (
            not self.validate
            or self._ema is None
            or trainer.sanity_checking
            or trainer.state.fn != TrainerFn.FITTING
        ):
            return
        # Before the first update the EMA model *is* the raw model (as in checkpoints): no swap, and
        # the `_ema` metrics equal the raw ones, so monitors of `val/acc_ema` find their key.
        swap = self.swapped() if self._num_updates > 0 else nullcontext()
        with isolate_rng(include_cuda=True), torch.no_grad(), swap:
            self._validate_average(trainer, pl_module)

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

    def _validate_average(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loaders = trainer.val_dataloaders
        if isinstance(loaders, dict):
            loaders = list(loaders.values())
        elif not isinstance(loaders, (list, tuple)):
            loaders = [loaders]
        limits = list(trainer.num_val_batches)
        multi = len(loaders) > 1
        with _metric_clones(pl_module) as metric_names:
            for idx, loader in enumerate(loaders):
                limit = limits[idx] if idx < len(limits) else float("inf")
                batches = loader if limit == float("inf") else itertools.islice(loader, int(limit))
                for batch_idx, batch in enumerate(batches):
                    batch = trainer.strategy.batch_to_device(batch, dataloader_idx=idx)
                    args = (batch, batch_idx, idx) if multi else (batch, batch_idx)
                    suffix = self.suffix + (f"/dataloader_idx_{idx}" if multi else "")
                    with _renamed_logging(pl_module, suffix, batch, metric_names):
                        trainer.strategy.validation_step(*args)

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
        """Saves :meth:`ema_state_dict` with ``torch.save`` (rank 0 only).

        Example::

            ema.save_ema_weights("ema.pt")
            model.load_state_dict(torch.load("ema.pt", weights_only=True))
        """
        torch.save(self.ema_state_dict(), path)

    # ------------------------------------------------------------ checkpoints

    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "latest_update_step": self._latest_update_step,
            "latest_update_epoch": self._latest_update_epoch,
            "num_updates": self._num_updates,
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest_update_step = int(state_dict.get("latest_update_step", 0))
        self._latest_update_epoch = int(state_dict.get("latest_update_epoch", -1))
        self._num_updates = int(state_dict.get("num_updates", self._num_updates))

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None:
            return
        self._average_model.n_averaged.fill_(self._num_updates)
        if self._num_updates == 0:
            # Never-updated average: save the raw weights as "the model" rather than the initial ones.
            if self._ema is None:
                self._ema = self._build_ema(pl_module)
            self._ema.copy_live_to_average()
        if "current_model_state" in checkpoint:
            # Another averaging callback already owns the model layout; keep ours in our own state.
            own = checkpoint.setdefault("callbacks", {}).setdefault(self.state_key, {})
            average_state = self._average_model.state_dict()
            own["average_model_state"] = {k: v.detach().clone() for k, v in average_state.items()}
            return
        super().on_save_checkpoint(trainer, pl_module, checkpoint)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is None or trainer.state.fn != TrainerFn.FITTING:
            # Outside fit the model keeps checkpoint["state_dict"], i.e. the EMA weights.
            return
        own = checkpoint.get("callbacks", {}).get(self.state_key, {}).get("average_model_state")
        if own is not None:
            self._average_model.load_state_dict(own)
        else:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
        self._num_updates = int(self._average_model.n_averaged.item())


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


def _batch_size(batch: Any) -> int:
    try:
        return extract_batch_size(batch)
    except MisconfigurationException:
        return 1


@contextmanager
def _metric_clones(pl_module: nn.Module) -> Iterator[dict[int, str]]:
    """Replaces every top-level torchmetrics Metric/MetricCollection by a fresh clone, then restores it.

    Yields ``{id(metric): attribute name}`` of the clones, as ``self.log`` needs for Metric values.
    """
    replaced: list[tuple[nn.Module, str, nn.Module]] = []

    def walk(module: nn.Module) -> None:
        for name, child in list(module._modules.items()):
            if isinstance(child, (Metric, MetricCollection)):
                clone = child.clone()
                clone.reset()
                module._modules[name] = clone
                replaced.append((module, name, child))
            elif child is not None:
                walk(child)

    try:
        walk(pl_module)
        yield {id(m): n for n, m in pl_module.named_modules() if isinstance(m, Metric)}
    finally:
        for module, name, original in reversed(replaced):
            module._modules[name] = original


@contextmanager
def _renamed_logging(pl_module: pl.LightningModule, suffix: str, batch: Any, metric_names: dict[int, str]):
    """Routes ``pl_module.log`` calls to ``name + suffix``, logged once per epoch, weighted by batch size."""
    original = pl_module.log
    signature = inspect.signature(original)
    had_attr = "log" in pl_module.__dict__

    def log(*args: Any, **kwargs: Any) -> None:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        params = bound.arguments
        params["name"] = f"{params['name']}{suffix}"
        params["on_step"], params["on_epoch"] = False, True
        params["add_dataloader_idx"] = False
        value = params["value"]
        if params.get("batch_size") is None:
            params["batch_size"] = _batch_size(batch)
        if isinstance(value, Metric) and params.get("metric_attribute") is None:
            params["metric_attribute"] = metric_names.get(id(value))
        original(**params)

    saved = pl_module.__dict__.get("log")
    pl_module.log = log  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had_attr:
            pl_module.log = saved  # type: ignore[method-assign]
        else:
            del pl_module.log
