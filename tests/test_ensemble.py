import math

import lightning as L
import pytest
import torch
from helpers import PlainClassifier, digits_loaders, digits_tensors, quiet_trainer_kwargs
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_tricks.datamodules.resampling import bootstrap_indices
from lightning_tricks.ensemble import EnsembleClassifier


def _members(n=3, num_classes=10):
    torch.manual_seed(0)
    return [PlainClassifier(num_classes=num_classes) for _ in range(n)]


def test_forward_is_mean_of_member_softmax():
    members = _members()
    x, _ = digits_tensors(32)
    ensemble = EnsembleClassifier(members)
    with torch.no_grad():
        manual = sum(torch.softmax(m(x), dim=1) for m in members) / 3
        probs = ensemble(x)
    assert torch.allclose(probs, manual, atol=1e-7)
    assert torch.allclose(probs.sum(1), torch.ones(32))
    assert ensemble.num_classes == 10


def test_from_snapshots_loads_each_state_and_files(tmp_path):
    members = _members(2)
    path = tmp_path / "snapshot_2.pt"
    torch.save({"state_dict": members[1].state_dict(), "global_step": 5, "index": 2}, path)
    template = PlainClassifier()
    ensemble = EnsembleClassifier.from_snapshots(template, [members[0].state_dict(), path])
    for built, original in zip(ensemble.members, members, strict=True):
        assert built is not template
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in built.state_dict().items())
    factory_built = EnsembleClassifier.from_snapshots(PlainClassifier, [path])
    assert torch.equal(factory_built.members[0].net[1].weight, members[1].net[1].weight)


def test_class_count_mismatch_names_both_counts():
    with pytest.raises(ValueError, match=r"number of classes \(member 0: 10, member 1: 5\)"):
        EnsembleClassifier([PlainClassifier(num_classes=10), PlainClassifier(num_classes=5)])
    # detected by a forward pass when members carry no readable output layer
    a = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    b = nn.Sequential(nn.Flatten(), nn.Linear(64, 7), nn.Identity())
    with pytest.raises(ValueError, match=r"member 0: 10, member 1: 7"):
        EnsembleClassifier([a, b], example_input=torch.zeros(1, 1, 8, 8))


def test_input_size_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"input channels/features \(member 0: 64, member 1: 32\)"):
        EnsembleClassifier([PlainClassifier(in_features=64), PlainClassifier(in_features=32)])
    with pytest.raises(ValueError, match=r"member 0 cannot take inputs of shape \(1, 3, 8, 8\)"):
        EnsembleClassifier([PlainClassifier()], example_input=torch.zeros(1, 3, 8, 8))


def test_trainer_test_and_predict_match_manual(tmp_path):
    members = _members(3)
    x, y = digits_tensors(200)
    loader = DataLoader(TensorDataset(x, y), batch_size=200)
    trainer = L.Trainer(**quiet_trainer_kwargs(tmp_path))
    ensemble = EnsembleClassifier(members)
    with torch.no_grad():
        manual = torch.stack([torch.softmax(m(x), 1) for m in members]).mean(0)
    metrics = trainer.test(ensemble, loader, verbose=False)[0]
    assert metrics["test/acc_ensemble"] == pytest.approx(
        (manual.argmax(1) == y).float().mean().item(), abs=1e-6
    )
    nll = -manual.log().gather(1, y[:, None]).mean().item()
    assert metrics["test/loss_ensemble"] == pytest.approx(nll, rel=1e-5)
    predicted = torch.cat(trainer.predict(ensemble, loader))
    assert torch.allclose(predicted, manual, atol=1e-7)


def test_from_checkpoints_loads_independent_models_weights_only(tmp_path):
    train, _ = digits_loaders(64, n_train=64)
    paths, trained = [], []
    for seed in (0, 1):
        L.seed_everything(seed)
        model = PlainClassifier(hidden=16 + seed)  # hyperparameters differ per member
        trainer = L.Trainer(max_steps=1, **quiet_trainer_kwargs(tmp_path))
        trainer.fit(model, train)
        paths.append(tmp_path / f"m{seed}.ckpt")
        trainer.save_checkpoint(paths[-1])
        trained.append(model)
    ensemble = EnsembleClassifier.from_checkpoints(paths, module_cls=PlainClassifier)
    for built, original in zip(ensemble.members, trained, strict=True):
        assert built.hparams.hidden == original.hparams.hidden
        assert all(torch.equal(v, original.state_dict()[k]) for k, v in built.state_dict().items())


def test_bootstrap_indices_fraction_reproducibility_and_seeds():
    n = 20_000
    a, b, c = bootstrap_indices(n, seed=0), bootstrap_indices(n, seed=0), bootstrap_indices(n, seed=1)
    assert a.shape == (n,) and a.dtype == torch.int64 and a.min() >= 0 and a.max() < n
    assert torch.equal(a, b) and not torch.equal(a, c)
    # unique fraction of a bootstrap sample: 1 - (1 - 1/n)^n -> 1 - 1/e; std ~ 0.0034 at n = 20000
    expected = 1 - (1 - 1 / n) ** n
    assert abs(expected - (1 - 1 / math.e)) < 1e-4
    for idx in (a, c):
        assert abs(idx.unique().numel() / n - expected) < 0.02
    torch.manual_seed(5)
    state = torch.get_rng_state()
    bootstrap_indices(100, seed=3)
    assert torch.equal(state, torch.get_rng_state())  # the global RNG is untouched
    with pytest.raises(ValueError, match=r"`n` must be an integer >= 1, got 0"):
        bootstrap_indices(0, seed=0)
