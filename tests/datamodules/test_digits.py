"""Digits and synthetic DataModules: real data, seeded stratified splits, train-only statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from lightning_tricks.datamodules import DigitsDataModule, SyntheticDataModule


def split_labels(dm: DigitsDataModule, split: str) -> torch.Tensor:
    return dm._splits[split].tensors[1]


def test_split_sizes_stratified_disjoint_and_seeded():
    dm = DigitsDataModule(val_fraction=0.1, test_fraction=0.2, seed=3)
    dm.setup("fit")
    sizes = {name: len(ds) for name, ds in dm._splits.items()}
    assert sum(sizes.values()) == 1797
    assert sizes["test"] == math.ceil(0.2 * 1797) and abs(sizes["val"] - 0.1 * 1797) <= 1
    all_counts = np.bincount(load_digits().target, minlength=10) / 1797
    for split in ("train", "val", "test"):
        counts = np.bincount(split_labels(dm, split).numpy(), minlength=10) / sizes[split]
        assert np.abs(counts - all_counts).max() < 0.02, f"{split} is not stratified"
    # disjoint: no image appears in two splits
    flat = {name: {tuple(x.flatten().tolist()) for x in ds.tensors[0]} for name, ds in dm._splits.items()}
    duplicates_within_digits = 1797 - len(set().union(*flat.values()))
    assert len(flat["train"] & flat["test"]) <= duplicates_within_digits
    same_seed = DigitsDataModule(seed=3)
    same_seed.setup("fit")
    other_seed = DigitsDataModule(seed=4)
    other_seed.setup("fit")
    assert torch.equal(split_labels(same_seed, "test"), split_labels(dm, "test"))
    assert not torch.equal(split_labels(other_seed, "test"), split_labels(dm, "test"))


def test_statistics_come_from_the_train_split_only_and_normalise_every_split():
    dm = DigitsDataModule(image_size=32)
    dm.setup("fit")
    train = dm._splits["train"].tensors[0].numpy().astype(np.float64)
    assert dm.mean.item() == pytest.approx(train.mean(), rel=1e-5)
    assert dm.std.item() == pytest.approx(train.std(), rel=1e-4)
    test_images, labels = next(iter(dm.test_dataloader()))
    normalised, same_labels = dm.on_after_batch_transfer((test_images, labels), 0)
    expected = (test_images.numpy() - train.mean()) / train.std()
    np.testing.assert_allclose(normalised.numpy(), expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(same_labels, labels)
    restored = DigitsDataModule(image_size=32)
    restored.load_state_dict(dm.state_dict())
    assert torch.equal(restored.mean, dm.mean) and torch.equal(restored.std, dm.std)


def test_upscaled_images_keep_the_native_content():
    native, upscaled = DigitsDataModule(image_size=8), DigitsDataModule(image_size=32)
    native.setup()
    upscaled.setup()
    x8, x32 = native._splits["train"].tensors[0], upscaled._splits["train"].tensors[0]
    assert x8.shape[1:] == (1, 8, 8) and x32.shape[1:] == (1, 32, 32)
    pooled = torch.nn.functional.avg_pool2d(x32, 4).flatten()
    correlation = torch.corrcoef(torch.stack([pooled, x8.flatten()]))[0, 1]
    assert correlation > 0.95


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"val_fraction": 1.2}, "val_fraction"),
        ({"image_size": 4}, "image_size"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DigitsDataModule(**kwargs)


def test_synthetic_data_is_seeded_uint8_and_class_dependent():
    dm = SyntheticDataModule(num_classes=5, image_size=16, in_channels=3, num_train=500, seed=1)
    dm.setup()
    images, labels = dm._splits["train"].tensors
    assert images.dtype == torch.uint8 and images.shape == (500, 3, 16, 16)
    again = SyntheticDataModule(num_classes=5, image_size=16, in_channels=3, num_train=500, seed=1)
    again.setup()
    assert torch.equal(again._splits["train"].tensors[0], images)
    class_means = torch.stack([images[labels == c].float().mean(0) for c in range(5)])
    within = torch.stack([images[labels == c].float().std(0).mean() for c in range(5)]).mean()
    between = torch.cdist(class_means.flatten(1), class_means.flatten(1)).max() / (3 * 16 * 16) ** 0.5
    assert between > 0.5 * within, "class patterns must be distinguishable from noise"


def test_train_per_class_keeps_a_seeded_balanced_subset_and_the_other_splits():
    def splits(**kwargs):
        dm = DigitsDataModule(**kwargs)
        return {name: tuple(t.clone() for t in tensors) for name, tensors in dm.load_splits().items()}

    full, few, same, other = (
        splits(),
        splits(train_per_class=7),
        splits(train_per_class=7),
        splits(train_per_class=7, seed=1),
    )
    assert torch.bincount(few["train"][1]).tolist() == [7] * 10
    for name in ("val", "test"):
        assert torch.equal(few[name][0], full[name][0])
    assert torch.equal(few["train"][0], same["train"][0])
    assert not torch.equal(few["train"][0], other["train"][0])
    # every kept image is a training image of the full split
    flat_full = full["train"][0].flatten(1)
    assert all((flat_full == img.flatten()).all(dim=1).any() for img in few["train"][0])
    with pytest.raises(ValueError, match="train_per_class"):
        DigitsDataModule(train_per_class=0)
    with pytest.raises(ValueError, match="has only"):
        DigitsDataModule(train_per_class=10_000).load_splits()
