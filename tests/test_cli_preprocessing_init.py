"""Per-pixel standardisation, the small fixed-sigma initialisation and the nonlinearity choice, from YAML
through `lightning-tricks fit` on real digits, each checked against a computation in the test."""

from __future__ import annotations

import numpy as np
import torch
from helpers import write_digits_recipe_config
from torch import nn

from lightning_tricks.cli import build_cli
from lightning_tricks.datamodules.stats import STD_IMAGE_FLOOR


def _cli(tmp_path, run: bool) -> object:
    path = write_digits_recipe_config(
        tmp_path,
        {
            "model": "small_cnn",
            "model_kwargs": {"activation": "gelu"},
            "init": {"scheme": "small_normal", "std": 0.01},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        },
        data={"std_image": True},
        max_epochs=None,
        max_steps=2,
        limit_train_batches=None,
    )
    subcommand = ["fit"] if run else []  # run=False parses without subcommands
    return build_cli([*subcommand, "--config", path], run=run)


def test_yaml_std_image_small_normal_init_and_gelu_reach_the_data_and_the_network(tmp_path):
    net = _cli(tmp_path, run=False).model.net  # as built from the YAML, before any step

    activations = {type(m) for m in net.modules() if isinstance(m, (nn.ReLU, nn.GELU))}
    assert activations == {nn.GELU}
    weights = [m.weight for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for weight in weights:  # N(0, 0.01^2) whatever the fan-in: sample std within 10% of 0.01
        assert abs(weight.std().item() - 0.01) < 1e-3, weight.shape
        assert abs(weight.mean().item()) < 3 * 0.01 / weight.numel() ** 0.5 + 1e-4

    datamodule = _cli(tmp_path, run=True).datamodule  # fitted: statistics of its training split
    train = datamodule._split("train").tensors[0]
    pixels = train.double().numpy() / (255.0 if train.dtype == torch.uint8 else 1.0)
    mean_image, std_image = pixels.mean(axis=0), pixels.std(axis=0)
    expected = (pixels[:5] - mean_image) / np.maximum(std_image, STD_IMAGE_FLOOR)
    np.testing.assert_allclose(datamodule.stats.apply(train[:5]).numpy(), expected, rtol=1e-4, atol=1e-4)
