"""GradualUnfreezing and FineTune: trainable set and optimizer groups at each milestone, frozen weights
untouched, BatchNorm convention, resume equal to an uninterrupted run, and bad schedules."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from helpers import PlainClassifier, digits_loaders, quiet_trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from lightning_tricks.callbacks import FineTune, GradualUnfreezing
from lightning_tricks.recipes import ImageClassifier, OptimizerConfig, SchedulerConfig

# resnet20's stages from the input, with their depth below the head (layer decay).
DEPTH = {"stem": 4, "layer1": 3, "layer2": 2, "layer3": 1, "classifier": 0}
BASE_LR, DECAY = 0.1, 0.5


def _model(scheduler: str = "constant") -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        "resnet20",
        num_classes=10,
        in_channels=1,
        optimizer=OptimizerConfig(name="sgd", lr=BASE_LR, weight_decay=5e-4, layer_decay=DECAY),
        scheduler=SchedulerConfig(name=scheduler, interval="step"),
    )


def _is_bn(name: str, model: ImageClassifier) -> bool:
    module = model.net.get_submodule(name.rpartition(".")[0])
    return isinstance(module, nn.BatchNorm2d)


class Snapshot(L.Callback):
    """At each train-epoch start (after the unfreezing callback): trainable names and optimizer groups."""

    def __init__(self) -> None:
        self.trainable: dict[int, set[str]] = {}
        self.groups: dict[int, list[tuple[frozenset[str], float, float]]] = {}

    def on_train_epoch_start(self, trainer, pl_module):
        names = {id(p): n for n, p in pl_module.net.named_parameters()}
        self.trainable[trainer.current_epoch] = {
            n for n, p in pl_module.net.named_parameters() if p.requires_grad
        }
        self.groups[trainer.current_epoch] = [
            (frozenset(names[id(p)] for p in g["params"]), g["lr"], g.get("initial_lr", g["lr"]))
            for g in trainer.optimizers[0].param_groups
        ]


def _fit(model, callbacks, tmp_path, epochs: int, **kwargs) -> L.Trainer:
    train, val = digits_loaders(batch_size=16, n_train=64)
    trainer = L.Trainer(
        **{**quiet_trainer_kwargs(tmp_path), **kwargs},
        max_epochs=epochs,
        limit_val_batches=0,
        callbacks=callbacks,
    )
    trainer.fit(model, train, val)
    return trainer


def _expected_lr(name: str) -> float:
    return BASE_LR * DECAY ** DEPTH[name.split(".")[0]]


def test_gradual_unfreezing_trains_stages_from_the_head_down_with_discriminative_lrs(tmp_path):
    model = _model()
    snapshot = Snapshot()
    _fit(
        model,
        [GradualUnfreezing({1: "layer3", 2: "layer1"}), snapshot],
        tmp_path,
        epochs=3,
        limit_train_batches=2,
    )
    every = {n for n, _ in model.net.named_parameters()}
    bn = {n for n in every if _is_bn(n, model)}
    stage = {s: {n for n in every if n.split(".")[0] == s} for s in DEPTH}
    expected = {
        0: stage["classifier"] | bn,  # fastai: BatchNorm of frozen stages keeps training
        1: stage["classifier"] | stage["layer3"] | bn,
        2: every - stage["stem"] | bn,
    }
    for epoch, trainable in expected.items():
        assert snapshot.trainable[epoch] == trainable, epoch
        in_optimizer = set().union(*(names for names, _, _ in snapshot.groups[epoch]))
        assert in_optimizer == trainable, epoch  # the frozen parameters are not in the optimizer
        for names, lr, _ in snapshot.groups[epoch]:
            for name in names:
                assert lr == pytest.approx(_expected_lr(name)), (epoch, name)
    assert len(snapshot.groups[1]) > len(snapshot.groups[0])  # joined as new groups, old ones untouched
    assert snapshot.groups[1][: len(snapshot.groups[0])] == snapshot.groups[0]


def test_joined_groups_follow_the_schedule_at_its_current_position(tmp_path):
    model = _model("cosine")
    snapshot = Snapshot()
    _fit(model, [GradualUnfreezing({1: "all"}), snapshot], tmp_path, epochs=3, limit_train_batches=2)
    for epoch in (1, 2):
        positions = {round(lr / initial, 9) for _, lr, initial in snapshot.groups[epoch]}
        assert len(positions) == 1, epoch  # every group at the same fraction of its own nominal lr
        assert positions != {1.0}  # the cosine has moved
        for names, _, initial in snapshot.groups[epoch]:
            assert all(initial == pytest.approx(_expected_lr(n)) for n in names)


@pytest.mark.parametrize("train_bn", [True, False])
def test_frozen_weights_stay_bit_identical_and_batchnorm_follows_train_bn(tmp_path, train_bn):
    model = _model()
    frozen_stages = ("stem", "layer1", "layer2", "layer3")
    before = {k: v.clone() for k, v in model.net.state_dict().items()}
    _fit(model, [GradualUnfreezing({5: "all"}, train_bn=train_bn)], tmp_path, epochs=1, limit_train_batches=3)
    after = model.net.state_dict()
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    for key, value in before.items():
        if not key.startswith(frozen_stages):
            continue
        if train_bn and isinstance(model.net.get_submodule(key.rpartition(".")[0]), nn.BatchNorm2d):
            continue  # trained, checked below
        assert torch.equal(after[key], value), key  # weights, and with train_bn=False BN statistics
    bn_changed = not torch.equal(after["stem.1.running_mean"], before["stem.1.running_mean"])
    assert bn_changed == train_bn
    assert (not torch.equal(after["stem.1.weight"], before["stem.1.weight"])) == train_bn


def test_fine_tune_trains_the_head_for_freeze_epochs_then_everything(tmp_path):
    model = _model()
    snapshot = Snapshot()
    _fit(
        model,
        [FineTune(freeze_epochs=1, train_bn=False), snapshot],
        tmp_path,
        epochs=2,
        limit_train_batches=2,
    )
    every = {n for n, _ in model.net.named_parameters()}
    assert snapshot.trainable[0] == {"classifier.weight", "classifier.bias"}
    assert snapshot.trainable[1] == every
    in_optimizer = set().union(*(names for names, _, _ in snapshot.groups[1]))
    assert in_optimizer == every
    for names, lr, _ in snapshot.groups[1]:
        assert all(lr == pytest.approx(_expected_lr(n)) for n in names)


def test_resumed_run_has_the_same_frozen_set_groups_and_weights_as_an_uninterrupted_one(tmp_path):
    schedule = {1: "layer3", 2: "all"}
    common = dict(limit_train_batches=2, enable_checkpointing=True)
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full = _model("cosine")
    checkpoints = ModelCheckpoint(dirpath=full_dir, save_top_k=-1, every_n_epochs=1, filename="{epoch}")
    full_snapshot = Snapshot()
    _fit(full, [GradualUnfreezing(schedule), full_snapshot, checkpoints], full_dir, epochs=4, **common)

    resumed = _model("cosine")
    resumed_snapshot = Snapshot()
    train, val = digits_loaders(batch_size=16, n_train=64)
    trainer = L.Trainer(
        **{**quiet_trainer_kwargs(resumed_dir), **common},
        max_epochs=4,
        limit_val_batches=0,
        callbacks=[GradualUnfreezing(schedule), resumed_snapshot],
    )
    trainer.fit(resumed, train, val, ckpt_path=str(full_dir / "epoch=1.ckpt"))  # after the layer3 milestone
    for epoch in (2, 3):
        assert resumed_snapshot.trainable[epoch] == full_snapshot.trainable[epoch]
        for got, want in zip(resumed_snapshot.groups[epoch], full_snapshot.groups[epoch], strict=True):
            assert got[0] == want[0] and got[1:] == pytest.approx(want[1:]), epoch
    for key, value in full.net.state_dict().items():
        torch.testing.assert_close(resumed.net.state_dict()[key], value, msg=key)


class FilteringPlainClassifier(PlainClassifier):
    """A user's module that builds its optimizer from the trainable parameters, as BaseFinetuning asks."""

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.hparams.lr)


def test_a_plain_lightning_module_gets_its_stages_unfrozen_into_one_group_at_its_lr(tmp_path):
    torch.manual_seed(0)
    model = FilteringPlainClassifier(lr=0.1)  # net: Flatten, Linear "1", ReLU, Linear "3"
    snapshot = Snapshot()
    first = model.net[1].weight.detach().clone()
    train, _ = digits_loaders(batch_size=16, n_train=64)
    trainer = L.Trainer(
        **quiet_trainer_kwargs(tmp_path),
        max_epochs=2,
        limit_train_batches=2,
        limit_val_batches=0,
        callbacks=[GradualUnfreezing({1: "1"}), snapshot],
    )
    trainer.fit(model, train)
    assert snapshot.trainable[0] == {"3.weight", "3.bias"}
    assert snapshot.trainable[1] == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert [(set(names), lr) for names, lr, _ in snapshot.groups[1]] == [
        ({"3.weight", "3.bias"}, 0.1),
        ({"1.weight", "1.bias"}, 0.1),
    ]
    assert not torch.equal(model.net[1].weight, first)  # trained once unfrozen


def test_schedule_naming_a_missing_stage_fails_before_training_listing_the_stages(tmp_path):
    with pytest.raises(
        ValueError, match=r"schedule\[1\]='layer9' is not a stage.*stem, layer1, layer2, layer3"
    ):
        _fit(_model(), [GradualUnfreezing({1: "layer9"})], tmp_path, epochs=1, limit_train_batches=1)
    with pytest.raises(ValueError, match=r"schedule\[2\]='layer3' is after an earlier milestone's stage"):
        _fit(
            _model(),
            [GradualUnfreezing({1: "layer2", 2: "layer3"})],
            tmp_path,
            epochs=1,
            limit_train_batches=1,
        )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: GradualUnfreezing({}), "non-empty mapping"),
        (lambda: GradualUnfreezing({-1: "all"}), "epoch -1 must be an integer >= 0"),
        (lambda: FineTune(freeze_epochs=0), "freeze_epochs must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments_are_rejected_in_the_constructor(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_several_processes_are_refused_before_anything_is_frozen():
    model = _model()
    with pytest.raises(ValueError, match=r"runs on one device .*world size is 2.*never synchronises"):
        FineTune(freeze_epochs=1).setup(SimpleNamespace(world_size=2), model, "fit")
    assert all(p.requires_grad for p in model.parameters())
