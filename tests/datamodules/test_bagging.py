"""Bagging: a DataModule option that trains an ensemble member on a seeded bootstrap sample."""

from __future__ import annotations

import torch

from lightning_tricks.datamodules import DigitsDataModule, SyntheticDataModule
from lightning_tricks.datamodules.resampling import bootstrap_indices


def training_labels(dm) -> torch.Tensor:
    return torch.cat([labels for _, labels in dm.train_dataloader()])


def test_bootstrap_seed_resamples_the_training_split_with_replacement():
    full = DigitsDataModule(seed=0)
    full.setup("fit")
    bagged = DigitsDataModule(seed=0, bootstrap_seed=7)
    bagged.setup("fit")
    train_labels = full._splits["train"].tensors[1]
    expected = train_labels[bootstrap_indices(len(train_labels), 7)]
    seen = training_labels(bagged)
    assert len(seen) == len(train_labels)
    # Same multiset of labels as the bootstrap sample (the loader shuffles it).
    assert torch.equal(torch.bincount(seen, minlength=10), torch.bincount(expected, minlength=10))
    assert not torch.equal(torch.bincount(seen, minlength=10), torch.bincount(train_labels, minlength=10))
    # Statistics still come from the whole training split, not the resample.
    assert torch.equal(bagged.mean, full.mean)


def test_different_bootstrap_seeds_give_different_members_and_none_gives_the_split():
    members = []
    for seed in (1, 2):
        dm = SyntheticDataModule(num_train=300, bootstrap_seed=seed)
        dm.setup("fit")
        members.append(dm.train_dataloader().index.tolist())
    assert members[0] != members[1]
    plain = SyntheticDataModule(num_train=300)
    plain.setup("fit")
    assert sorted(training_labels(plain).tolist()) == sorted(plain._splits["train"].tensors[1].tolist())
