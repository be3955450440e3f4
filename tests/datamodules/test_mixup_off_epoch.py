"""mixup/cutmix switched off from an epoch on (timm's ``mixup_off_epoch``), also across a resume."""

from __future__ import annotations

import lightning as L
import torch
from helpers import quiet_trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.nn import functional as F

from lightning_tricks.datamodules import InMemoryImageDataModule


class Blobs(InMemoryImageDataModule):
    num_classes, in_channels, image_size = 4, 1, 4

    def load_splits(self):
        generator = torch.Generator().manual_seed(0)
        return {"train": (torch.rand(32, 1, 4, 4, generator=generator), torch.arange(32) % 4)}


class RecordTargets(L.LightningModule):
    """Records, per training batch, the epoch and whether its targets are mixed (soft, not one-hot)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(16, 4)
        self.mixed: list[tuple[int, bool]] = []

    def training_step(self, batch, batch_idx):
        images, targets = batch
        soft = targets.ndim == 2
        if soft:
            assert torch.allclose(targets.sum(1), torch.ones(len(targets)))
        self.mixed.append((self.current_epoch, soft and bool((targets.max(1).values < 1).any())))
        return F.cross_entropy(self.layer(images.flatten(1)), targets)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(root, max_epochs, callbacks=(), ckpt_path=None) -> list[tuple[int, bool]]:
    L.seed_everything(0, verbose=False)
    model = RecordTargets()
    data = Blobs(batch_size=16, batch_augment=["mixup", "cutmix"], mixup_off_epoch=2)
    kwargs = {**quiet_trainer_kwargs(root), "enable_checkpointing": bool(callbacks)}
    trainer = L.Trainer(max_epochs=max_epochs, limit_val_batches=0, callbacks=list(callbacks), **kwargs)
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    return model.mixed


def test_batches_are_mixed_before_the_off_epoch_and_clean_from_it_on_also_after_resume(tmp_path):
    folder = tmp_path / "ckpt"
    every_epoch = ModelCheckpoint(dirpath=folder, every_n_epochs=1, save_top_k=-1)
    full = _fit(tmp_path, 4, [every_epoch])
    assert full == [(e, e < 2) for e in range(4) for _ in range(2)]  # 2 batches per epoch

    # Resumed after epoch 0 (before the switch): epoch 1 still mixes, epochs 2 and 3 do not.
    assert _fit(tmp_path / "a", 4, ckpt_path=next(folder.glob("epoch=0-*.ckpt"))) == full[2:]
    # Resumed after epoch 2 (past the switch): mixing stays off.
    assert (
        _fit(tmp_path / "b", 5, ckpt_path=next(folder.glob("epoch=2-*.ckpt")))
        == [(3, False)] * 2 + [(4, False)] * 2
    )
