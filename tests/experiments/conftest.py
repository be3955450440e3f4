"""Tiny digits recipe and search files for the experiment tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

RECIPE = {
    "seed_everything": 0,
    "trainer": {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "deterministic": True,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_train_batches": 4,
        "log_every_n_steps": 1,
    },
    "model": {
        "class_path": "lightning_tricks.recipes.ImageClassifier",
        "init_args": {
            "model": "mlp",
            "model_kwargs": {"input_size": 8, "hidden": 32},
            "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        },
    },
    "data": {
        "class_path": "lightning_tricks.datamodules.DigitsDataModule",
        "init_args": {"batch_size": 32, "image_size": 8},
    },
}

LR = "model.init_args.optimizer.lr"
WD = "model.init_args.optimizer.weight_decay"


@pytest.fixture
def recipe(tmp_path: Path) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(RECIPE))
    return str(path)
