"""Config files compose left to right; a later file's ``trainer.callbacks`` list replaces the earlier one.

That is jsonargparse's rule for every list. To add callbacks from a later file, use its append
key ``callbacks+:`` (as ``--trainer.callbacks+=EMA`` does on the command line)::

    # configs/trainer/ema.yaml
    trainer:
      callbacks+:
        - class_path: lightning_tricks.callbacks.EMA

:func:`replaced_callbacks` finds the files whose plain ``callbacks:`` list drops callbacks set by
an earlier file, so that the command can say so instead of silently losing e.g. ``ModelCheckpoint``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ReplacedCallbacks", "replaced_callbacks"]


@dataclass(frozen=True)
class ReplacedCallbacks:
    """``later`` sets ``trainer.callbacks`` and so drops ``dropped``, which ``earlier`` had configured."""

    earlier: Path
    later: Path
    dropped: list[str]

    def message(self) -> str:
        return (
            f"{self.later} sets `trainer.callbacks:`, which replaces the callbacks of {self.earlier} "
            f"({', '.join(self.dropped)}). To add callbacks to them instead, write `callbacks+:` "
            f"in {self.later} (the config-file form of `--trainer.callbacks+=`)."
        )


def replaced_callbacks(config_files: Iterable[str | os.PathLike]) -> list[ReplacedCallbacks]:
    """Every config file whose ``trainer.callbacks`` replaces callbacks set by an earlier file.

    Example::

        >>> replaced_callbacks(["configs/digits.yaml", "configs/logger/wandb.yaml"])
        []
    """
    found: list[ReplacedCallbacks] = []
    current: tuple[Path, list[str]] | None = None
    for config_file in config_files:
        path = Path(os.fspath(config_file))
        trainer = _load(path).get("trainer")
        if not isinstance(trainer, dict) or "callbacks" not in trainer:
            continue
        names = _class_names(trainer["callbacks"])
        if current is not None:
            dropped = [name for name in current[1] if name not in names]
            if dropped:
                found.append(ReplacedCallbacks(current[0], path, dropped))
        current = (path, names)
    return found


def _load(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text()) if path.is_file() else None
    return loaded if isinstance(loaded, dict) else {}


def _class_names(callbacks: Any) -> list[str]:
    items = callbacks if isinstance(callbacks, list) else [callbacks]
    names = []
    for item in items:
        class_path = item.get("class_path") if isinstance(item, dict) else item
        if isinstance(class_path, str):
            names.append(class_path.rsplit(".", 1)[-1])
    return names
