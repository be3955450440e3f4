"""Recipes: the image-classification LightningModule and its building blocks."""

from lightning_tricks.recipes.classifier import ImageClassifier
from lightning_tricks.recipes.clipping import GradientClippingConfig
from lightning_tricks.recipes.init import InitConfig
from lightning_tricks.recipes.optim import OptimizerConfig
from lightning_tricks.recipes.regularization import RegularizationConfig
from lightning_tricks.recipes.schedules import SchedulerConfig

__all__ = [
    "GradientClippingConfig",
    "ImageClassifier",
    "InitConfig",
    "OptimizerConfig",
    "RegularizationConfig",
    "SchedulerConfig",
]
