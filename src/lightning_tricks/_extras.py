"""Imports of optional dependencies, failing with the ``pip install`` line of the extra that provides them.

Core features never import these; a feature that needs one calls :func:`import_optional` where it
starts (not at module import), so ``pip install lightning-tricks`` stays lean.

========  ===============================  ==================================================
extra     packages                         used by
========  ===============================  ==================================================
wandb     ``wandb``                        ``WandbLogger`` (configs/logger/wandb.yaml)
search    ``optuna``, ``sqlalchemy``       ``lightning-tricks search``
timm      ``timm``                         LARS/LAMB/Lookahead, AGC, ``model: timm/<name>``
bench     ``timm``, ``torch_ema``          benchmarks/ (reference implementations)
========  ===============================  ==================================================
"""

from __future__ import annotations

import importlib
from types import ModuleType

EXTRAS = {"wandb": "wandb", "optuna": "search", "sqlalchemy": "search", "timm": "timm", "torch_ema": "bench"}


def import_optional(name: str, purpose: str) -> ModuleType:
    """Import ``name``, or fail with the extra to install for ``purpose``.

    Example:

        >>> import_optional("math", "arithmetic").sqrt(4.0)
        2.0
        >>> import_optional("optuna_but_missing", "the search")
        Traceback (most recent call last):
        ...
        ModuleNotFoundError: the search needs the optional package `optuna_but_missing`, ...
    """
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name.split(".")[0] and err.name != name:
            raise  # the package is there but one of its own imports failed: show that error as is
        root = name.split(".")[0]
        extra = EXTRAS.get(root)
        fix = f"pip install 'lightning-tricks[{extra}]'" if extra else f"pip install {root}"
        raise ModuleNotFoundError(
            f"{purpose} needs the optional package `{root}`, which is not installed; install it with: {fix}",
            name=root,
        ) from None
