"""DataModules: in-memory digits and synthetic data, CIFAR, image folders, augmentation."""

from lightning_tricks.datamodules.digits import DigitsDataModule
from lightning_tricks.datamodules.in_memory import InMemoryImageDataModule
from lightning_tricks.datamodules.synthetic import SyntheticDataModule

__all__ = ["DigitsDataModule", "InMemoryImageDataModule", "SyntheticDataModule"]
