"""Test helpers: a plain user LightningModule (not the project's recipe) and real digits data.

Callbacks must work on any LightningModule, so callback tests use :class:`PlainClassifier`,
written the way a user would write one, on scikit-learn's real 8x8 digits.
"""

from __future__ import annotations

import lightning as L
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset


def digits_tensors(n: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Digits as float images (N, 1, 8, 8) scaled to [0, 1] and int64 labels, in a fixed order."""
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    if n is not None:
        x, y = x[:n], y[:n]
    return x, y


def digits_loaders(
    batch_size: int = 64, n_train: int = 1200, shuffle: bool = False
) -> tuple[DataLoader, DataLoader]:
    """Train/val loaders over a fixed split of the digits (train first ``n_train``, val the rest)."""
    x, y = digits_tensors()
    train = TensorDataset(x[:n_train], y[:n_train])
    val = TensorDataset(x[n_train:], y[n_train:])
    return (
        DataLoader(train, batch_size=batch_size, shuffle=shuffle),
        DataLoader(val, batch_size=256),
    )


class PlainClassifier(L.LightningModule):
    """A user's own small MLP classifier: logs ``train/loss``, ``val/loss`` and ``val/acc``."""

    def __init__(self, lr: float = 0.1, hidden: int = 64, num_classes: int = 10, in_features: int = 64):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val/acc", (logits.argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test/acc", (self(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9)


def quiet_trainer_kwargs(tmp_path) -> dict:
    """Trainer arguments for fast, silent, deterministic CPU tests."""
    return dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(tmp_path),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
    )


def logging_trainer_kwargs(tmp_path, log_every_n_steps: int) -> dict:
    """:func:`quiet_trainer_kwargs` with a CSVLogger that writes every ``log_every_n_steps`` steps, for
    tests that tell the steps on which Lightning logs from the quiet ones in between."""
    return {
        **quiet_trainer_kwargs(tmp_path),
        "logger": CSVLogger(tmp_path),
        "log_every_n_steps": log_every_n_steps,
    }


def write_digits_recipe_config(
    tmp_path,
    model: dict,
    callbacks: list[dict] | None = None,
    data: dict | None = None,
    **trainer: object,
) -> str:
    """A `lightning-tricks fit` YAML file: the recipe with ``model`` as its init_args on 8x8 digits
    (``data`` adds DataModule init_args), 2 short epochs unless ``trainer`` overrides; returns its path."""
    config = {
        "seed_everything": 0,
        "test_after_fit": False,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "logger": False,
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path),
            "callbacks": callbacks or [],
            **trainer,
        },
        "model": {"class_path": "lightning_tricks.recipes.ImageClassifier", "init_args": model},
        "data": {
            "class_path": "lightning_tricks.datamodules.DigitsDataModule",
            "init_args": {"batch_size": 32, "image_size": 8, **(data or {})},
        },
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


class Interrupted(Exception):
    """Raised by :class:`StopAtStep`."""


class StopAtStep(L.Callback):
    """Ends ``fit`` with an error after ``step`` optimizer steps, the way a crashed run ends."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Interrupted


class MetricRecorder(L.Callback):
    """Records the names of every metric seen at the end of validation and test (``seen``)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen |= set(trainer.callback_metrics)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.seen |= set(trainer.callback_metrics)


# Two processes each import torch and Lightning before the first collective: on a loaded 2-core
# machine that alone can take minutes, so DDP tests (the shared launch of DDP scenarios and the DDP
# subprocesses) get a limit sized for a slow machine; the pytest default would flag them as hung.
DDP_TIMEOUT = 900


def ddp_trainer_kwargs(tmp_path) -> dict:
    """:func:`quiet_trainer_kwargs` for both processes of a DDP scenario (tests/ddp_launch.py)."""
    return {**quiet_trainer_kwargs(tmp_path), "devices": 2, "strategy": "ddp"}


def record_calls(monkeypatch, cls: type, name: str, argument: int) -> list:
    """Patch ``cls.name`` to record its positional ``argument`` (after ``self``) on every call; returns
    the list, which stays empty when the method never runs."""
    seen: list = []
    original = getattr(cls, name)

    def recording(self, *args, **kwargs):
        seen.append(args[argument])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, recording)
    return seen
