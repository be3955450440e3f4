"""``lightning-tricks --help`` and ``--version``: subcommands, shipped configs, names, examples."""

from __future__ import annotations

import argparse
import inspect
from pathlib import Path

from jsonargparse import DefaultHelpFormatter
from lightning.pytorch import Callback

import lightning_tricks

__all__ = ["DESCRIPTION", "HelpFormatter", "epilog", "shipped_configs", "version"]

DESCRIPTION = (
    "Train and evaluate image classifiers with the classic tricks of training CNNs\n"
    "(LightningCLI: every option can come from YAML files or the command line)."
)
# Repository layout (src/lightning_tricks/ -> configs/); absent when installed from a wheel.
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help formatter that keeps the epilog's line breaks."""


def version() -> str:
    import lightning
    import torch

    versions = f"lightning {lightning.__version__}, torch {torch.__version__}"
    return f"lightning-tricks {lightning_tricks.__version__} ({versions})"


def shipped_configs() -> list[str]:
    """Paths of the shipped configs relative to the repository (``configs/digits.yaml`` ...)."""
    if not CONFIGS.is_dir():
        return []
    return sorted(str(path.relative_to(CONFIGS.parent)) for path in CONFIGS.rglob("*.yaml"))


def _wrapped(label: str, names: list[str], width: int = 100) -> str:
    lines, line = [], f"  {label}:"
    for name in names:
        if len(line) + len(name) + 1 > width:
            lines.append(line + ",")
            line = "    " + name
        else:
            line += (" " if line.endswith(":") else ", ") + name
    return "\n".join([*lines, line])


def _concrete(module: object, name: str) -> bool:
    """Whether ``module.name`` is a class that can be built (not an abstract base)."""
    return not inspect.isabstract(getattr(module, name))


def epilog() -> str:
    """Examples, shipped configs, and the names usable for models, DataModules and callbacks."""
    import lightning_tricks.callbacks as callbacks
    import lightning_tricks.datamodules as datamodules
    from lightning_tricks.recipes.models import list_models

    configs = shipped_configs()
    callback_names = [
        name
        for name in callbacks.__all__
        if isinstance(getattr(callbacks, name), type)
        and issubclass(getattr(callbacks, name), Callback)
        and _concrete(callbacks, name)
    ]
    parts = [
        "examples:",
        "  lightning-tricks fit --config configs/digits.yaml               # quickstart: trains, then tests",
        "  lightning-tricks fit --config configs/digits.yaml --config configs/logger/wandb.yaml",
        "  lightning-tricks fit --config configs/digits.yaml --trainer.callbacks+=EMA --trainer.max_epochs 4",
        "  lightning-tricks fit --config configs/digits.yaml --print_config   # the full resolved config",
        "  lightning-tricks test --config configs/digits.yaml --ckpt_path runs/digits/.../best-epoch=7.ckpt",
        "  lightning-tricks fit --help                                         # every option of `fit`",
        "",
        *(
            ["shipped configs (in the source repository):", *(f"  {path}" for path in configs), ""]
            if configs
            else []
        ),
        "names (use as --model.init_args.model NAME, --data NAME, --trainer.callbacks+=NAME):",
        _wrapped("models", [*list_models(), "timm/<name>"]),
        # abstract bases (InMemoryImageDataModule) cannot be built; jsonargparse leaves them out of --data too
        _wrapped(
            "data", [n for n in datamodules.__all__ if n.endswith("DataModule") and _concrete(datamodules, n)]
        ),
        _wrapped("callbacks", callback_names),
    ]
    return "\n".join(parts)
