"""DataModules: in-memory digits and synthetic data, CIFAR, image folders, augmentation."""

from lightning_tricks.datamodules.augment import PRESETS, BatchAugment, PCALighting, build_transform
from lightning_tricks.datamodules.base import InMemoryImageDataModule, PreprocessedImageDataModule
from lightning_tricks.datamodules.cifar import CIFAR10DataModule, CIFAR100DataModule
from lightning_tricks.datamodules.digits import DigitsDataModule
from lightning_tricks.datamodules.draws import SeededDraws, SeededDrawSampler
from lightning_tricks.datamodules.folder import ImageFolderDataModule
from lightning_tricks.datamodules.in_memory import TensorBatchLoader
from lightning_tricks.datamodules.on_device import OnDeviceAugment
from lightning_tricks.datamodules.order import ResumableSampler
from lightning_tricks.datamodules.resampling import bootstrap_indices
from lightning_tricks.datamodules.stats import ImageStatistics, channel_mean_std
from lightning_tricks.datamodules.synthetic import SyntheticDataModule

__all__ = [
    "PRESETS",
    "BatchAugment",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DigitsDataModule",
    "ImageFolderDataModule",
    "ImageStatistics",
    "InMemoryImageDataModule",
    "OnDeviceAugment",
    "PCALighting",
    "PreprocessedImageDataModule",
    "ResumableSampler",
    "SeededDrawSampler",
    "SeededDraws",
    "SyntheticDataModule",
    "TensorBatchLoader",
    "bootstrap_indices",
    "build_transform",
    "channel_mean_std",
]
