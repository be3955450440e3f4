"""The shared evaluator: the module's own step on averaged predictions and swapped weights, on every
eval dataloader, with torchmetrics objects cloned, against predictions computed here."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import PlainClassifier, digits_tensors, quiet_trainer_kwargs
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset
from torchmetrics.classification import MulticlassAccuracy

from lightning_tricks.evaluation import evaluate_prediction_average, evaluate_weights


class MetricClassifier(PlainClassifier):
    """Logs accuracy through a torchmetrics object, as most Lightning projects do."""

    def __init__(self) -> None:
        super().__init__()
        self.val_acc = MulticlassAccuracy(num_classes=10, average="micro")

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val/acc", self.val_acc)
        self.log("val/loss", F.cross_entropy(logits, y))


class Evaluate(L.Callback):
    def __init__(self, members):
        self.members = members
        self.metric_before = None

    def on_validation_epoch_end(self, trainer, pl_module):
        self.metric_before = pl_module.val_acc
        self.logged = evaluate_prediction_average(trainer, pl_module, "val", self.members)
        with torch.no_grad():
            pl_module.net[1].weight.mul_(2.0)  # evaluate_weights runs on whatever weights are in
            evaluate_weights(trainer, pl_module, "val", "_shifted")
            pl_module.net[1].weight.div_(2.0)  # exact: powers of two


def test_prediction_average_and_swapped_weights_on_two_dataloaders(tmp_path):
    x, y = digits_tensors()
    loaders = [DataLoader(TensorDataset(x[i : i + 300], y[i : i + 300]), batch_size=64) for i in (0, 300)]
    torch.manual_seed(0)
    model, a, b = MetricClassifier(), PlainClassifier(), PlainClassifier()
    members = {"_m1": a.state_dict(), "_m2": b.state_dict()}
    evaluate = Evaluate(members)
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path), callbacks=[evaluate])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = trainer.validate(model, loaders, verbose=False)

    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert model.val_acc is evaluate.metric_before  # the original metric object is back
    shifted = MetricClassifier()
    shifted.load_state_dict(before)
    with torch.no_grad():
        shifted.net[1].weight.mul_(2.0)
    for i, values in enumerate(metrics):
        xs, ys = x[300 * i : 300 * i + 300], y[300 * i : 300 * i + 300]
        with torch.no_grad():
            pa, pb = a(xs).softmax(-1), b(xs).softmax(-1)
            mean = (pa + pb) / 2
            own, moved = model(xs), shifted(xs)
        tag = f"/dataloader_idx_{i}"
        # the module's own metrics are its own (one Metric object across both loaders is its choice)
        assert values[f"val/loss{tag}"] == pytest.approx(F.cross_entropy(own, ys).item(), rel=1e-5)
        expected_acc = (mean.argmax(1) == ys).float().mean().item()
        assert values[f"val/acc_ensemble{tag}"] == pytest.approx(expected_acc, abs=1e-6)
        nll = -mean.log().gather(1, ys[:, None]).mean().item()
        assert values[f"val/loss_ensemble{tag}"] == pytest.approx(nll, rel=1e-4)
        for key, p in (("_m1", pa), ("_m2", pb)):
            member_acc = (p.argmax(1) == ys).float().mean().item()
            assert values[f"val/acc{key}{tag}"] == pytest.approx(member_acc, abs=1e-6)
        moved_acc = (moved.argmax(1) == ys).float().mean().item()
        assert values[f"val/acc_shifted{tag}"] == pytest.approx(moved_acc, abs=1e-6)
    assert evaluate.logged["val/acc_ensemble/dataloader_idx_1"]["sync_dist"] is True


class TupleForward(PlainClassifier):
    def forward(self, x):
        return self.net(x), None

    def validation_step(self, batch, batch_idx):
        self.log("val/acc", (self(batch[0])[0].argmax(1) == batch[1]).float().mean())


def test_prediction_average_refuses_a_forward_without_logits(tmp_path):
    x, y = digits_tensors(64)
    model = TupleForward()

    class Run(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            evaluate_prediction_average(trainer, pl_module, "val", {"_m": pl_module.state_dict()})

    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path), callbacks=[Run()])
    with pytest.raises(Exception, match=r"forward that returns logits .*got tuple from TupleForward.forward"):
        trainer.validate(model, DataLoader(TensorDataset(x, y), batch_size=32), verbose=False)
    assert "forward" not in model.__dict__ and "log" not in model.__dict__
