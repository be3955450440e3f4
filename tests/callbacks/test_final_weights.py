"""Which weights the model holds at the end of fit when EMA, SWA, snapshots, restore_best_weights and
ModelCheckpoint are combined (lightning_tricks.callbacks.final_weights), compared with weights recorded
during the run."""

from __future__ import annotations

import copy
import warnings

import lightning as L
import pytest
import torch
from helpers import PlainClassifier, digits_loaders, quiet_trainer_kwargs
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, StochasticWeightAveraging

from lightning_tricks.callbacks import EMA, SmoothedEarlyStopping, SnapshotEnsemble
from lightning_tricks.callbacks.final_weights import describe_final_weights, weights_for_test_after_fit


class EpochRecorder(Callback):
    """The raw and EMA weights at the end of each validation, and after the last optimizer step."""

    def __init__(self) -> None:
        self.raw: list[dict[str, torch.Tensor]] = []
        self.ema: list[dict[str, torch.Tensor] | None] = []
        self.last: dict[str, torch.Tensor] = {}

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self.raw.append(copy.deepcopy(pl_module.state_dict()))
        emas = [cb for cb in trainer.callbacks if isinstance(cb, EMA)]
        self.ema.append(emas[0].ema_state_dict() if emas and emas[0].num_updates else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.last = copy.deepcopy(pl_module.state_dict())


def run(tmp_path, callbacks, max_epochs=4, **kwargs):
    """A few 10-step epochs of PlainClassifier on digits; returns trainer, model and the recorder."""
    torch.manual_seed(0)
    model = PlainClassifier(lr=0.2)
    recorder = EpochRecorder()
    train, val = digits_loaders(n_train=600)
    trainer = L.Trainer(
        **{**quiet_trainer_kwargs(tmp_path), **kwargs},
        max_epochs=max_epochs,
        limit_val_batches=2,
        callbacks=[recorder, *callbacks],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train, val)
    trainer.caught = [str(w.message) for w in caught]
    return trainer, model, recorder


def assert_weights(model, expected):
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def restoring(monitor="val/loss"):
    return SmoothedEarlyStopping(monitor=monitor, smoothing=None, patience=100, restore_best_weights=True)


def test_raw_weights_without_weight_choosing_callbacks(tmp_path):
    trainer, model, recorder = run(tmp_path, [], max_epochs=2)
    assert_weights(model, recorder.last)
    assert describe_final_weights(trainer) == "the raw weights of the last optimizer step (step 20)"
    final = describe_final_weights(trainer)
    assert weights_for_test_after_fit(trainer) == (None, f"the final model: {final}")


def test_ema_alone_is_the_final_model(tmp_path):
    ema = EMA(decay=0.9)
    trainer, model, recorder = run(tmp_path, [ema], max_epochs=2)
    assert_weights(model, recorder.ema[-1])
    assert not torch.equal(recorder.ema[-1]["net.1.weight"], recorder.last["net.1.weight"])
    assert describe_final_weights(trainer) == (
        "the EMA weights (decay=0.9, 'num_updates' warm-up, 20 updates), copied into the model by EMA"
    )


@pytest.mark.parametrize("es_first", [False, True])
def test_restore_on_a_raw_metric_wins_over_ema_in_any_order_and_says_so(tmp_path, es_first):
    ema, es = EMA(decay=0.9), restoring("val/loss")
    trainer, model, recorder = run(tmp_path, [es, ema] if es_first else [ema, es])
    # The warning comes before training and names the fix.
    (warning,) = [m for m in trainer.caught if "will not be the final model" in m]
    assert "restore the raw weights of its best epoch" in warning and "'val/loss_ema'" in warning
    losses = [float(v) for v in es_history(recorder, trainer, "val/loss")]
    assert es.best_epoch == min(range(len(losses)), key=losses.__getitem__)
    assert_weights(model, recorder.raw[es.best_epoch])
    restored = f"the raw weights of epoch {es.best_epoch}, restored by SmoothedEarlyStopping"
    assert describe_final_weights(trainer).startswith(f"{restored} (best val/loss_smoothed = ")


def es_history(recorder, trainer, name):
    """val/loss of each epoch, evaluated independently from the recorded raw weights."""
    _, val = digits_loaders(n_train=600)
    batches = [b for i, b in enumerate(val) if i < 2]
    out = []
    for state in recorder.raw:
        model = PlainClassifier()
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            losses = [torch.nn.functional.cross_entropy(model(x), y) for x, y in batches]
        out.append(torch.stack(losses).mean())
    return out


@pytest.mark.parametrize("es_first", [False, True])
def test_restore_on_an_ema_metric_restores_the_ema_weights(tmp_path, es_first):
    ema, es = EMA(decay=0.9), restoring("val/loss_ema")
    trainer, model, recorder = run(tmp_path, [es, ema] if es_first else [ema, es])
    assert not [m for m in trainer.caught if "will not be the final model" in m]
    assert recorder.ema[es.best_epoch] is not None
    assert_weights(model, recorder.ema[es.best_epoch])
    assert describe_final_weights(trainer).startswith(
        f"the EMA ('ema') weights of epoch {es.best_epoch}, restored by SmoothedEarlyStopping"
    )


def test_restore_and_best_checkpoint_test_the_restored_weights(tmp_path):
    es = restoring("val/loss")
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max")
    trainer, _, _ = run(tmp_path, [es, best], enable_checkpointing=True)
    ckpt_path, description = weights_for_test_after_fit(trainer)
    assert ckpt_path is None
    assert description.startswith(f"the final model: the raw weights of epoch {es.best_epoch}, restored")
    assert description.endswith(f"; the best checkpoint {best.best_model_path} is not tested")


def test_best_checkpoint_is_tested_without_a_restore(tmp_path):
    ema = EMA(decay=0.9)
    best = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc_ema", mode="max")
    trainer, _, _ = run(tmp_path, [ema, best], max_epochs=2, enable_checkpointing=True)
    ckpt_path, description = weights_for_test_after_fit(trainer)
    assert ckpt_path == "best"
    score = float(best.best_model_score)
    assert description == (
        f"the ema weights of the best checkpoint {best.best_model_path} (chosen on val/acc_ema = {score:.4g})"
    )
    assert torch.load(best.best_model_path, weights_only=True)["state_dict_weights"] == "ema"


def test_swa_alone_and_with_a_non_copying_ema(tmp_path):
    ema = EMA(decay=0.9, copy_average_at_end=False)
    swa = StochasticWeightAveraging(swa_lrs=0.05, swa_epoch_start=2)
    trainer, model, recorder = run(tmp_path, [ema, swa], max_epochs=4)
    # swa_epoch_start=2 is the zero-based epoch 1: Lightning averages the weights at the start of
    # epochs 1, 2 and 3, i.e. after epochs 0, 1 and 2, with equal weights.
    assert (swa.swa_start, swa.swa_end) == (1, 3)
    expected = {k: sum(recorder.raw[e][k] for e in range(3)) / 3 for k in recorder.raw[0]}
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-6, msg=name)
    assert describe_final_weights(trainer) == (
        "the SWA average of 3 models (taken at the start of epochs 1-3), written by StochasticWeightAveraging"
    )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: [EMA(decay=0.9), StochasticWeightAveraging(swa_lrs=0.05)], r"EMA\(suffix='_ema'\) and "),
        (lambda: [EMA(decay=0.9), EMA(decay=0.99, suffix="_ema99")], "would each write their average"),
        (lambda: [restoring(), StochasticWeightAveraging(swa_lrs=0.05)], "both write the final weights"),
        (lambda: [restoring(), restoring("val/acc")], "only one can choose the final weights"),
    ],
)
def test_order_dependent_combinations_are_refused_before_training(tmp_path, make, match):
    torch.manual_seed(0)
    model = PlainClassifier()
    before = copy.deepcopy(model.state_dict())
    train, val = digits_loaders(n_train=600)
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path), max_epochs=2, callbacks=make())
    with pytest.raises(ValueError, match=match):
        trainer.fit(model, train, val)
    assert trainer.global_step == 0
    assert_weights(model, before)


def test_snapshot_ensemble_leaves_the_final_model_to_the_rule(tmp_path):
    ema = EMA(decay=0.9)
    snapshots = SnapshotEnsemble(cycles=2, save_files=False)
    trainer, model, recorder = run(tmp_path, [ema, snapshots])
    assert_weights(model, recorder.ema[-1])
    # the last snapshot is the raw weights of the last step, not the final model
    assert_weights_equal(snapshots.snapshots[-1], recorder.last)
    description = describe_final_weights(trainer)
    assert description.startswith("the EMA weights (decay=0.9")
    assert description.endswith(
        f"; SnapshotEnsemble does not change it (its ensemble is logged as */acc_ensemble, snapshots in "
        f"{snapshots.dirpath})"
    )


def assert_weights_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
