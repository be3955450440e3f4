"""One rule for which weights the model holds at the end of ``fit`` and which weights a checkpoint holds.

Several callbacks can write the model's weights when training ends. The rule, first match wins:

1. **Restored best weights.** :class:`~lightning_tricks.callbacks.SmoothedEarlyStopping` with
   ``restore_best_weights=True`` that recorded a best check loads the weights its ``monitor`` was
   measured on at that check: the raw weights for ``val/loss``, the EMA weights for ``val/loss_ema``
   (an :class:`~lightning_tricks.callbacks.EMA` metric, see :meth:`EMA.measures`). When an averaging
   callback below would otherwise be final, a rank-0 warning says so before training.
2. **An average.** :class:`~lightning_tricks.callbacks.EMA` with ``copy_average_at_end=True`` that
   updated at least once copies its average in; Lightning's
   :class:`~lightning.pytorch.callbacks.StochasticWeightAveraging` that reached its last epoch writes
   the SWA average.
3. **The raw weights** of the last optimizer step.

:class:`~lightning_tricks.callbacks.SnapshotEnsemble` never writes the model: its ensemble is
evaluated and logged on its own (``val/acc_ensemble``) and kept as snapshot files.

Refused before training with a ``ValueError``, because the outcome would depend on callback order:
two averaging callbacks that both write the model at the end (two ``EMA(copy_average_at_end=True)``,
or one with ``StochasticWeightAveraging``), two restoring callbacks, and ``restore_best_weights``
together with ``StochasticWeightAveraging`` (whose average is written by Lightning after or before
the restore, depending on the callback list).

**Checkpoints** hold, in ``state_dict``, the weights their ``ModelCheckpoint(monitor=...)`` measures
(labelled in ``checkpoint["state_dict_weights"]``; the other weights are stored beside them, see
:class:`~lightning_tricks.callbacks.EMA`). Lightning's SWA checkpoints hold the raw weights in
``state_dict`` and the average in the callback state.

**Test after fit** (``lightning-tricks fit``) evaluates, see :func:`weights_for_test_after_fit`: the
restored weights when rule 1 applied (the user asked for the model to *be* those weights), else the
best checkpoint of the ``ModelCheckpoint`` when there is one, else the final model.

Example::

    from lightning_tricks.callbacks.final_weights import describe_final_weights

    trainer.fit(model, datamodule=dm)
    print(describe_final_weights(trainer))
    # the EMA weights (decay=0.999, 'num_updates' warm-up, 160 updates), copied into the model by EMA
"""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor

from lightning_tricks.callbacks.early_stopping import SmoothedEarlyStopping
from lightning_tricks.callbacks.ema import EMA
from lightning_tricks.callbacks.snapshot import SnapshotEnsemble


def _emas(trainer: pl.Trainer) -> list[EMA]:
    return [cb for cb in trainer.callbacks if isinstance(cb, EMA)]


def _swas(trainer: pl.Trainer) -> list[StochasticWeightAveraging]:
    return [cb for cb in trainer.callbacks if isinstance(cb, StochasticWeightAveraging)]


def _restorers(trainer: pl.Trainer) -> list[SmoothedEarlyStopping]:
    callbacks = trainer.callbacks
    return [cb for cb in callbacks if isinstance(cb, SmoothedEarlyStopping) and cb.restore_best_weights]


def measuring_ema(trainer: pl.Trainer, metric: str) -> EMA | None:
    """The :class:`EMA` whose weights ``metric`` was measured on (``val/acc_ema``), or ``None`` (raw)."""
    return next((ema for ema in _emas(trainer) if ema.measures(metric)), None)


def weights_measured_by(trainer: pl.Trainer, metric: str) -> dict[str, Tensor]:
    """The ``state_dict`` of the weights ``metric`` was measured on: an EMA's average or the live weights.

    Example::

        best = weights_measured_by(trainer, "val/loss_ema")   # the EMA's weights, module keys
    """
    ema = measuring_ema(trainer, metric)
    if ema is not None and ema.num_updates > 0:
        return ema.ema_state_dict()
    return trainer.lightning_module.state_dict()


def pending_restore(trainer: pl.Trainer) -> SmoothedEarlyStopping | None:
    """The callback that restores best weights at the end of this ``fit`` (rule 1), if any."""
    return next((cb for cb in _restorers(trainer) if cb.best_weights is not None), None)


def check_final_weights(trainer: pl.Trainer, caller: pl.Callback) -> None:
    """Refuse, before training, combinations whose final weights would depend on callback order.

    Warns (rank 0) when restored best weights will replace an average that would otherwise be final.
    Every callback taking part calls this; only the first of them in ``trainer.callbacks`` checks.
    """
    participants = [*_emas(trainer), *_restorers(trainer)]
    if caller is not min(participants, key=trainer.callbacks.index, default=caller):
        return
    copying = [f"EMA(suffix={e.suffix!r})" for e in _emas(trainer) if e.copy_average_at_end]
    copying += [type(s).__name__ for s in _swas(trainer)]
    if len(copying) > 1:
        raise ValueError(
            f"{' and '.join(copying)} would each write their average into the model at the end of fit. "
            "Keep one: set EMA(copy_average_at_end=False) on the others (their metrics and "
            "checkpoint copies stay)."
        )
    restorers = _restorers(trainer)
    if len(restorers) > 1:
        raise ValueError(
            f"{len(restorers)} SmoothedEarlyStopping callbacks have restore_best_weights=True; only one can "
            "choose the final weights. Set restore_best_weights=False on the others."
        )
    if not restorers:
        return
    restorer = restorers[0]
    if _swas(trainer):
        raise ValueError(
            f"SmoothedEarlyStopping(monitor={restorer.monitor!r}, restore_best_weights=True) and "
            "StochasticWeightAveraging both write the final weights, in an order set by the callback "
            "list. Use one of them."
        )
    ema = measuring_ema(trainer, restorer.monitor)
    averaging = [e for e in _emas(trainer) if e.copy_average_at_end and e is not ema]
    if averaging:
        suffix = averaging[0].suffix
        rank_zero_warn(
            f"SmoothedEarlyStopping(monitor={restorer.monitor!r}, restore_best_weights=True) will "
            f"restore the {'raw' if ema is None else ema.weights_name} weights of its best epoch at the end "
            f"of fit, so EMA(suffix={suffix!r})'s average will not be the final model (checkpoints keep it). "
            f"Monitor an EMA metric such as {restorer.monitor + suffix!r} to restore the EMA's best "
            "weights, or set EMA(copy_average_at_end=False)."
        )


def state_dict_weights(trainer: pl.Trainer) -> str:
    """What this ``fit``'s checkpoints hold in ``state_dict``: ``"raw"`` or an EMA's ``weights_name``."""
    owner = next((e for e in _emas(trainer) if e.holds_state_dict), None)
    return "raw" if owner is None else owner.weights_name


def _snapshot_note(trainer: pl.Trainer) -> str:
    notes = [
        f"; SnapshotEnsemble does not change it (its ensemble is logged as */acc_ensemble, snapshots in "
        f"{cb.dirpath})"
        for cb in trainer.callbacks
        if isinstance(cb, SnapshotEnsemble)
    ]
    return notes[0] if notes else ""


def describe_final_weights(trainer: pl.Trainer) -> str:
    """One line saying which weights the model holds at the end of ``fit``, by the rule above.

    Meant for an end-of-fit summary; called before the end of ``fit`` it describes the plan.

    Example::

        >>> from lightning.pytorch import Trainer
        >>> describe_final_weights(Trainer(logger=False, enable_checkpointing=False))
        'the raw weights of the last optimizer step (step 0)'
    """
    restorer = pending_restore(trainer)
    if restorer is not None:
        ema = measuring_ema(trainer, restorer.monitor)
        which = "raw" if ema is None else f"{ema.weights_name.upper()} ({ema.weights_name!r})"
        text = (
            f"the {which} weights of epoch {restorer.best_epoch}, restored by SmoothedEarlyStopping "
            f"(best {restorer.smoothed_name} = {float(restorer.best_score):.4g})"
        )
        return text + _snapshot_note(trainer)
    for ema in _emas(trainer):
        if ema.copy_average_at_end and ema.num_updates > 0:
            warmup = "no warm-up" if ema.warmup is None else f"{ema.warmup!r} warm-up"
            text = (
                f"the EMA weights (decay={ema.decay}, {warmup}, {ema.num_updates} updates), copied into the "
                "model by EMA"
            )
            return text + _snapshot_note(trainer)
    for swa in _swas(trainer):
        averaged = 0 if swa.n_averaged is None else int(swa.n_averaged)
        # Lightning writes the average in on_train_end once the last SWA epoch has run.
        if averaged > 0 and trainer.current_epoch - 1 >= swa.swa_end:
            text = (
                f"the SWA average of {averaged} models (taken at the start of epochs {swa.swa_start}-"
                f"{swa.swa_end}), written by StochasticWeightAveraging"
            )
            return text + _snapshot_note(trainer)
    text = f"the raw weights of the last optimizer step (step {trainer.global_step})"
    return text + _snapshot_note(trainer)


def weights_for_test_after_fit(trainer: pl.Trainer) -> tuple[str | None, str]:
    """Which weights ``test`` after ``fit`` evaluates: ``(ckpt_path for trainer.test, description)``.

    The restored best weights when a restore happened (rule 1), else the best checkpoint of
    ``trainer.checkpoint_callback`` when it wrote one, else the final model (``ckpt_path=None``).

    Example::

        ckpt_path, description = weights_for_test_after_fit(trainer)
        print(f"test uses {description}")
        trainer.test(model, datamodule=dm, ckpt_path=ckpt_path)
    """
    checkpoint = trainer.checkpoint_callback
    best = checkpoint.best_model_path if isinstance(checkpoint, ModelCheckpoint) else ""
    if pending_restore(trainer) is None and best:
        chosen = (
            f"chosen on {checkpoint.monitor} = {float(checkpoint.best_model_score):.4g}"
            if checkpoint.monitor and checkpoint.best_model_score is not None
            else "the latest, no monitor"
        )
        weights = state_dict_weights(trainer)
        return "best", f"the {weights} weights of the best checkpoint {best} ({chosen})"
    text = f"the final model: {describe_final_weights(trainer)}"
    if best:
        text += f"; the best checkpoint {best} is not tested"
    return None, text
