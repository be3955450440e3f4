"""The batch/output adapter on modules written here: dict batches, tuple- and dict-returning forwards,
module hooks, and the messages for shapes it cannot read."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import digits_tensors, quiet_trainer_kwargs
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_tricks.adapters import inputs_of, logits_of, split_batch, with_logits
from lightning_tricks.ensemble import EnsembleClassifier
from lightning_tricks.evaluation import evaluate_prediction_average


class DictDigits(Dataset):
    def __init__(self, n: int) -> None:
        self.x, self.y = digits_tensors(n)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"image": self.x[i], "label": self.y[i]}


class TupleForward(L.LightningModule):
    """Dict batches, a forward returning (logits, features), its own metric names."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU())
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        features = self.body(x)
        return self.head(features), features

    def validation_step(self, batch, batch_idx):
        logits, _ = self(batch["image"])
        self.log("val_acc", (logits.argmax(1) == batch["label"]).float().mean())

    def test_step(self, batch, batch_idx):
        self.validation_step(batch, batch_idx)


class ScoresForward(TupleForward):
    """A dict output under a key the adapter does not know, declared by the module's hooks."""

    def forward(self, x):
        logits, features = super().forward(x)
        return {"scores": logits, "features": features}

    def logits_of(self, output):
        return output["scores"]

    def with_logits(self, output, logits):
        return {**output, "scores": logits}

    def validation_step(self, batch, batch_idx):
        scores = self(batch["image"])["scores"]
        self.log("val_acc", (scores.argmax(1) == batch["label"]).float().mean())


def manual_mean_probs(members, x):
    with torch.no_grad():
        return torch.stack([logits_of(m(x), m).softmax(-1) for m in members]).mean(0)


@pytest.mark.parametrize("module_cls", [TupleForward, ScoresForward])
def test_prediction_average_on_dict_batches_and_structured_outputs(tmp_path, module_cls):
    torch.manual_seed(0)
    model, a, b = module_cls(), module_cls(), module_cls()

    class Run(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            evaluate_prediction_average(
                trainer, pl_module, "val", {"_a": a.state_dict(), "_b": b.state_dict()}
            )

    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path), callbacks=[Run()])
    (metrics,) = trainer.validate(model, DataLoader(DictDigits(300), batch_size=64), verbose=False)
    x, y = digits_tensors(300)
    mean = manual_mean_probs([a, b], x)
    assert metrics["val_acc_ensemble"] == pytest.approx((mean.argmax(1) == y).float().mean().item(), abs=1e-6)
    for key, member in (("_a", a), ("_b", b)):
        own = (logits_of(member(x), member).argmax(1) == y).float().mean().item()
        assert metrics[f"val_acc{key}"] == pytest.approx(own, abs=1e-6)
    assert "forward" not in model.__dict__


def test_ensemble_classifier_on_dict_batches_and_tuple_forwards(tmp_path):
    torch.manual_seed(0)
    members = [TupleForward(), ScoresForward()]
    ensemble = EnsembleClassifier(members)
    loader = DataLoader(DictDigits(200), batch_size=50)
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path))
    (metrics,) = trainer.test(ensemble, loader, verbose=False)
    x, y = digits_tensors(200)
    mean = manual_mean_probs(members, x)
    assert metrics["test/acc_ensemble"] == pytest.approx(
        (mean.argmax(1) == y).float().mean().item(), abs=1e-6
    )
    nll = F.nll_loss(mean.log(), y).item()
    assert metrics["test/loss_ensemble"] == pytest.approx(nll, rel=1e-5)
    predicted = torch.cat(trainer.predict(ensemble, loader))
    assert torch.allclose(predicted, mean, atol=1e-6)


def test_default_rules_and_messages():
    t = torch.ones(2, 3)
    assert split_batch([t, 1, "extra"]) == (t, 1)
    assert split_batch({"inputs": t, "targets": 1}) == (t, 1)
    assert split_batch({"a": 1}, splitter=lambda b: (b["a"], None)) == (1, None)
    assert inputs_of({"pixel_values": t}) is t
    assert logits_of({"logits": t, "aux": 0}) is t and logits_of([t]) is t
    assert with_logits((t, "aux"), t * 2)[1] == "aux" and with_logits([t], 1) == [1]
    with pytest.raises(ValueError, match=r"batch of \['img', 'cls'\].*Define `split_batch\(self, batch\)`"):
        split_batch({"img": t, "cls": 1})
    with pytest.raises(
        ValueError, match=r"forward output of \['scores'\].*Define `logits_of\(self, output\)`"
    ):
        logits_of({"scores": t})
    with pytest.raises(ValueError, match=r"forward output of str"):
        logits_of("not logits")
