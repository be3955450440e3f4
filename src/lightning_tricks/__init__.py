"""lightning-tricks: callbacks, recipes and DataModules for the classic tricks of training CNNs."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "run_dir"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `import lightning_tricks` (e.g. for `__version__`) does not import Lightning.
    if name == "run_dir":
        from lightning_tricks.records import run_dir

        return run_dir
    raise AttributeError(f"module 'lightning_tricks' has no attribute {name!r}")
