"""timm architectures in the zoo by name: ``timm/<name>`` (e.g. ``timm/resnet18``), when timm is installed.

Models are always built with ``pretrained=False``, so nothing is ever downloaded; pretrained weights come from
a local file (``ImageClassifier(pretrained=...)``, :mod:`lightning_tricks.recipes.pretrained`). Extra keyword
arguments go to ``timm.create_model`` (``drop_rate``, ``drop_path_rate``...). timm is optional:
``pip install 'lightning-tricks[timm]'``.

Example::

    from lightning_tricks.recipes.models import create_model

    net = create_model("timm/resnet18", num_classes=10, in_channels=1, drop_path_rate=0.1)
"""

from __future__ import annotations

import difflib
from typing import Any

from torch import nn

from lightning_tricks._extras import import_optional

TIMM_PREFIX = "timm/"


def is_timm_name(name: str) -> bool:
    """Whether a zoo name asks for a timm model (``timm/<name>``)."""
    return name.startswith(TIMM_PREFIX)


def check_timm_name(name: str) -> str:
    """The timm architecture of ``timm/<arch>``; an unknown one raises ``ValueError`` with close matches."""
    timm = import_optional("timm", f"model {name!r}")
    arch = name[len(TIMM_PREFIX) :]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = (
            f"did you mean {', '.join(TIMM_PREFIX + c for c in close)}?"
            if close
            else "see timm.list_models()"
        )
        raise ValueError(f"model {name!r}: timm has no architecture {arch!r}; {hint}")
    return arch


def create_timm_model(name: str, num_classes: int, in_channels: int = 3, **kwargs: Any) -> nn.Module:
    """Build ``timm/<arch>`` with random weights (``pretrained=False``: never a download).

    Raises:
        ValueError: unknown architecture (with close matches) or ``pretrained=True`` in ``kwargs``.
    """
    arch = check_timm_name(name)
    if kwargs.pop("pretrained", False):
        raise ValueError(
            f"model {name!r}: timm weights are never downloaded; remove model_kwargs.pretrained and set "
            "model.init_args.pretrained to a local weights file instead"
        )
    timm = import_optional("timm", f"model {name!r}")
    try:
        return timm.create_model(
            arch, pretrained=False, num_classes=num_classes, in_chans=in_channels, **kwargs
        )
    except TypeError as err:
        raise TypeError(f"model {name!r} got an argument timm.create_model does not accept: {err}") from None
