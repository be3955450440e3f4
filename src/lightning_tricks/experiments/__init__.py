"""Experiments over LightningCLI recipes: hyperparameter search (Optuna) and seeded ablations.

Example::

    lightning-tricks search --config configs/search/digits_mlp.yaml --search configs/search/digits_lr_wd.yaml
    lightning-tricks ablate --ablation configs/ablations/digits_few_labels.yaml
"""

from lightning_tricks.experiments.space import Param, SearchSpace

__all__ = ["Param", "SearchSpace"]
