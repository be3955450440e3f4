"""ImageClassifier: loss composition, regularisation switch, optimizer wiring and checkpoints."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.recipes import ImageClassifier, OptimizerConfig, RegularizationConfig, SchedulerConfig


def make_classifier(**kwargs) -> ImageClassifier:
    defaults = dict(model="mlp", num_classes=10, in_channels=1, model_kwargs={"input_size": 8})
    return ImageClassifier(**{**defaults, **kwargs})


def test_training_loss_is_data_loss_plus_half_l2_of_weights_only():
    torch.manual_seed(0)
    model = make_classifier(regularization=RegularizationConfig(l2=0.01, label_smoothing=0.1))
    images, targets = torch.randn(8, 1, 8, 8), torch.randint(10, (8,))
    weights = [m.weight for m in model.net.modules() if isinstance(m, nn.Linear)]
    expected_penalty = 0.01 / 2 * sum((w**2).sum() for w in weights)
    expected = F.cross_entropy(model(images), targets, label_smoothing=0.1) + expected_penalty
    loss = model.training_step((images, targets), 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_soft_targets_give_soft_cross_entropy():
    torch.manual_seed(0)
    model = make_classifier()
    images = torch.randn(4, 1, 8, 8)
    soft = torch.softmax(torch.randn(4, 10), dim=1)
    expected = -(soft * model(images).log_softmax(1)).sum(1).mean()
    assert model.data_loss(model(images), soft).item() == pytest.approx(expected.item(), rel=1e-5)


def test_regularization_scaled_switches_everything_off_and_restores_it():
    model = make_classifier(
        regularization=RegularizationConfig(
            l1=0.001, l2=0.01, label_smoothing=0.2, dropout=0.3, drop_connect=0.4
        )
    )
    drops = {type(m).__name__: m.p for m in model.net.modules() if hasattr(m, "p")}
    assert drops == {"Dropout": 0.3, "DropConnectLinear": 0.4}
    logits, targets = torch.zeros(2, 10), torch.tensor([1, 2])
    base_penalty = model.penalty().item()
    assert base_penalty > 0
    with model.regularization_scaled(0.0):
        assert model.penalty().item() == 0.0
        assert all(m.p == 0.0 for m in model.net.modules() if hasattr(m, "p"))
        # without smoothing, CE of uniform logits against one-hot targets is exactly ln(10)
        assert model.data_loss(logits, targets).item() == pytest.approx(torch.log(torch.tensor(10.0)).item())
        # and of any logits it is -log softmax at each sample's own label (smoothing off), by hand
        peaked = torch.tensor([[0.0, 5.0, 1.0, *[0.0] * 7], [2.0, 0.0, -1.0, *[0.5] * 7]])
        expected = (peaked.exp().sum(1).log() - peaked[torch.arange(2), targets]).mean()
        assert model.data_loss(peaked, targets).item() == pytest.approx(expected.item(), rel=1e-6)
    with model.regularization_scaled(10.0):
        assert model.penalty().item() == pytest.approx(10 * base_penalty, rel=1e-5)
    assert {type(m).__name__: m.p for m in model.net.modules() if hasattr(m, "p")} == drops
    assert model.penalty().item() == pytest.approx(base_penalty)


def test_configured_optimizer_has_no_decay_on_norm_and_bias_and_scaled_lr(tmp_path):
    dm = DigitsDataModule(batch_size=32, image_size=32)
    model = ImageClassifier(
        "resnet20",
        num_classes=10,
        in_channels=1,
        optimizer=OptimizerConfig(lr=0.1, weight_decay=5e-4, base_batch_size=16),
        scheduler=SchedulerConfig(name="cosine", interval="step", warmup=3),
    )
    trainer = L.Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    optimizer = trainer.optimizers[0]
    no_decay = {id(p) for m in model.net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    no_decay |= {id(p) for name, p in model.net.named_parameters() if name.endswith("bias")}
    groups = {g["weight_decay"]: {id(p) for p in g["params"]} for g in optimizer.param_groups}
    assert groups[0.0] == no_decay
    assert groups[5e-4] == {id(p) for p in model.parameters()} - no_decay
    # linear scaling: lr x (32 per device x 1 device x 2 accumulated) / 16
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.1 * 64 / 16)


def test_checkpoint_loads_weights_only_and_restores_the_model(tmp_path):
    dm = DigitsDataModule(batch_size=64)
    model = make_classifier(regularization=RegularizationConfig(l2=1e-4), optimizer=OptimizerConfig(lr=0.05))
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, dm)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["hyper_parameters"]["optimizer"]["lr"] == 0.05
    restored = ImageClassifier.load_from_checkpoint(path, weights_only=True)
    assert restored.optimizer_config == model.optimizer_config
    for a, b in zip(restored.state_dict().values(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_unknown_tta_and_conflicting_dropout_fail_early():
    with pytest.raises(ValueError, match="tta"):
        make_classifier(tta="sideways")
    with pytest.raises(ValueError, match="dropout"):
        make_classifier(
            regularization=RegularizationConfig(dropout=0.2), model_kwargs={"input_size": 8, "dropout": 0.1}
        )


@pytest.mark.parametrize("mode", ["hflip", "ten_crop"])
def test_tta_is_logged_beside_plain_accuracy_on_the_plain_view(mode):
    from torchvision.transforms.v2 import functional as TF

    torch.manual_seed(0)
    model = ImageClassifier("small_cnn", num_classes=3, in_channels=3, tta=mode).eval()
    images, targets = torch.randn(6, 3, 36, 36), torch.tensor([0, 1, 2, 0, 1, 2])
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    model.test_step((images, targets), 0)
    plain = images if mode == "hflip" else TF.center_crop(images, [32, 32])  # round(0.875 * 36)
    with torch.no_grad():
        plain_acc = (model(plain).argmax(1) == targets).float().mean()
        views = [images, images.flip(-1)] if mode == "hflip" else list(TF.ten_crop(images, [32, 32]))
        tta_acc = (
            (torch.stack([model(v).softmax(1) for v in views]).mean(0).argmax(1) == targets).float().mean()
        )
    assert logged["test/acc"].compute() == pytest.approx(plain_acc.item())
    assert logged["test/acc_tta"].compute() == pytest.approx(tta_acc.item())


def test_epoch_training_accuracy_counts_every_batch_of_the_epoch():
    torch.manual_seed(0)
    model = make_classifier()
    model.log = lambda *args, **kwargs: None
    batches = [(torch.randn(5, 1, 8, 8), torch.randint(10, (5,))) for _ in range(3)]
    correct = 0
    for i, (images, targets) in enumerate(batches):
        with torch.no_grad():
            correct += (model(images).argmax(1) == targets).sum().item()
        model.training_step((images, targets), i)
    assert model.train_acc.compute().item() == pytest.approx(correct / 15)


def test_tta_reads_dict_batches_through_the_adapter():
    torch.manual_seed(0)
    model = ImageClassifier("small_cnn", num_classes=3, in_channels=3, tta="hflip").eval()
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    with torch.no_grad():
        expected = (model(images).softmax(1) + model(images.flip(-1)).softmax(1)) / 2
    predicted = model.predict_step({"image": images, "label": targets}, 0)
    torch.testing.assert_close(predicted, expected)
    logged = {}
    model.log = lambda name, value, **kwargs: logged.__setitem__(name, value)
    model.test_step({"image": images, "label": targets}, 0)
    assert logged["test/acc_tta"].compute() == pytest.approx(
        (expected.argmax(1) == targets).float().mean().item()
    )


class _TenSamples(L.LightningDataModule):
    def __init__(self, drop_last: bool) -> None:
        super().__init__()
        self.drop_last = drop_last

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        data = torch.utils.data.TensorDataset(torch.rand(10, 1, 8, 8), torch.randint(10, (10,)))
        return torch.utils.data.DataLoader(data, batch_size=64, drop_last=self.drop_last)


# Lightning's own notes about the deliberately empty loader and the absent validation split.
@pytest.mark.filterwarnings("ignore:Total length of")
@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.parametrize("budget", [{"max_epochs": 1}, {"max_epochs": -1, "max_steps": 2}])
def test_data_smaller_than_one_batch_with_drop_last_is_refused_before_training(tmp_path, budget):
    """Even with a constant lr (no schedule to build) and a step budget, which hides the empty epoch."""
    seen: list[int] = []
    model = make_classifier(scheduler=SchedulerConfig(name="constant"))
    model.on_train_batch_start = lambda batch, batch_idx: seen.append(batch_idx)

    def trainer() -> L.Trainer:
        return L.Trainer(
            **budget,
            accelerator="cpu",
            logger=False,
            enable_checkpointing=False,
            default_root_dir=tmp_path,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
        )

    with pytest.raises(ValueError, match=r"10 samples, batch_size=64 and drop_last=True") as refused:
        trainer().fit(model, datamodule=_TenSamples(drop_last=True))
    assert "drop_last=False" in str(refused.value) and "data.init_args.batch_size=10" in str(refused.value)
    assert seen == []
    kept = trainer()
    kept.fit(model, datamodule=_TenSamples(drop_last=False))  # the fix: one incomplete batch per epoch
    assert kept.global_step == budget.get("max_steps", 1)
