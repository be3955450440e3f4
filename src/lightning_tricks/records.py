"""Each run keeps its own record: one folder per run, and the full resolved config in the logger.

Lightning's ``trainer.log_dir`` is a per-run folder for CSV and TensorBoard (``version_N``) but, for
W&B and other loggers, their shared ``save_dir``, where the next run overwrites the previous one's
files. :func:`run_dir` always names the run's own folder; :class:`RunConfigSaver` writes the CLI's
resolved config there (``config.yaml`` for ``fit``, ``test_config.yaml`` and so on for the other
subcommands) and logs the same config (model, data, trainer, callbacks) as the logger's
hyperparameters under ``config``. It never overwrites a config file the run was started with.

Example::

    from lightning_tricks import run_dir

    class SavePlot(L.Callback):
        def on_fit_end(self, trainer, pl_module):
            folder = run_dir(trainer)  # call on every rank: the folder is broadcast from rank 0
            if trainer.is_global_zero:
                figure.savefig(folder / "plot.png")
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning_utilities.core.imports import RequirementCache

from lightning_tricks._io import atomic_write_bytes

__all__ = ["RunConfigSaver", "run_dir"]

# Files a value may name as a config file (a list or a class given as a file); never checkpoints.
_CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
# Keep None values (e.g. `scheduler: null`) so the saved config re-runs the same experiment;
# jsonargparse 4.49 renamed the keyword from `skip_none` to `skip_unset`.
_KEEP_NONE = {"skip_unset": False} if RequirementCache("jsonargparse>=4.49") else {"skip_none": False}


def run_dir(trainer: pl.Trainer) -> Path:
    """The folder that belongs to this run alone, for files such as configs and plots.

    - CSV / TensorBoard: the logger's versioned ``log_dir`` (``<save_dir>/<name>/version_N``).
    - W&B: the run's own local folder (``<save_dir>/wandb/<offline-run-...>``), beside the
      ``files/`` folder that W&B manages itself.
    - any other logger: its ``log_dir`` if it has one, else its ``save_dir``.
    - no logger: ``trainer.default_root_dir`` (shared by runs without a logger).

    Call it on every rank, like ``trainer.log_dir``: rank 0 decides and the path is broadcast.
    """
    folder = _rank_zero_run_dir(trainer.loggers[0]) if trainer.loggers and trainer.is_global_zero else None
    folder = trainer.strategy.broadcast(folder)
    return Path(folder or trainer.default_root_dir)


def _rank_zero_run_dir(logger: Logger) -> str | None:
    if isinstance(logger, WandbLogger):
        # `experiment` starts the W&B run (rank 0 only); `dir` is its `files/` folder.
        return str(Path(logger.experiment.dir).parent)
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return logger.log_dir
    return getattr(logger, "log_dir", None) or logger.save_dir


def input_config_files(config: Namespace, command_line: Sequence[str] = ()) -> set[Path]:
    """The config files a run read, as absolute paths.

    These are the ``--config`` files, the nested ones that jsonargparse keeps under ``__path__``
    (``--data data.yaml``, a list item such as ``--trainer.callbacks+=ema.yaml`` or ``- ema.yaml``), and
    the YAML/JSON files that a value names: a whole list read from a file (``--trainer.callbacks
    callbacks.yaml``) keeps no ``__path__``, so ``command_line`` values and the strings inside the files
    found are checked too (relative to the working directory and to the file that names them).
    """
    found = {_resolved(path) for path in [*(config.get("config") or []), *_nested_paths(config)] if path}
    found |= _config_files_named(_command_line_values(command_line), [Path.cwd()])
    pending = list(found)
    while pending:
        path = pending.pop()
        named = _config_files_named(_strings(_load_yaml(path)), [path.parent, Path.cwd()]) - found
        found |= named
        pending += named
    return found


def _resolved(path: Any) -> Path:
    return Path(getattr(path, "absolute", path)).resolve()


def _nested_paths(value: Any) -> Iterator[Any]:
    """``__path__`` values anywhere in a parsed config, inside lists included."""
    items = vars(value) if isinstance(value, Namespace) else value
    if isinstance(items, dict):
        for key, item in items.items():
            if key == "__path__":
                yield item
            else:
                yield from _nested_paths(item)
    elif isinstance(items, (list, tuple)):
        for item in items:
            yield from _nested_paths(item)


def _command_line_values(args: Sequence[str]) -> Iterator[str]:
    for arg in args:
        yield arg.split("=", 1)[1] if arg.startswith("--") and "=" in arg else arg


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings(item)


def _config_files_named(values: Iterator[str], folders: list[Path]) -> set[Path]:
    """The existing YAML/JSON files among ``values``, each tried relative to ``folders``."""
    found = set()
    for value in values:
        if Path(value).suffix.lower() not in _CONFIG_SUFFIXES:
            continue
        for folder in folders:
            path = folder / Path(value).expanduser()
            try:
                if path.is_file():
                    found.add(path.resolve())
            except (OSError, ValueError):  # a value that cannot be a path (too long, a NUL byte)
                continue
    return found


def _load_yaml(path: Path) -> Any:
    """The file's YAML content, or ``None`` when it is not YAML (only its strings are read)."""
    if path.suffix.lower() not in _CONFIG_SUFFIXES:
        return None
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None


class RunConfigSaver(SaveConfigCallback):
    """LightningCLI's config saver, writing into :func:`run_dir` and into the loggers' hyperparameters.

    The CLI passes it as ``save_config_callback``. ``fit`` saves ``config.yaml``, which re-runs the
    same experiment with ``lightning-tricks fit --config <run folder>/config.yaml``; ``validate``,
    ``test`` and ``predict`` save ``<subcommand>_config.yaml``, so evaluating in the fit run's folder
    (``logger: false``) keeps its ``config.yaml``. A file the run read its config from is never
    overwritten: the config then goes to ``<subcommand>_config.yaml`` (``_1``, ``_2``, ... if that is
    an input too). Config files named inside lists count as read too (``--trainer.callbacks
    callbacks.yaml``, a list item ``- ema.yaml``): pass the raw ``command_line`` for the first form.
    Written atomically, as one file (``multifile=True`` and ``overwrite=False`` are refused).

    Example::

        LightningCLI(save_config_callback=RunConfigSaver, save_config_kwargs={"overwrite": True})
    """

    def __init__(self, *args: Any, command_line: Sequence[str] = (), **kwargs: Any) -> None:
        self.command_line = list(command_line)
        kwargs["save_to_log_dir"] = False  # written by `save_config` into the run's own folder instead
        super().__init__(*args, **kwargs)
        if self.multifile or not self.overwrite:
            raise ValueError(
                f"RunConfigSaver(multifile={self.multifile}, overwrite={self.overwrite}) is not supported: "
                "it writes the resolved config as one file, replacing only its own earlier one (never a "
                "config file the run read); use multifile=False, overwrite=True"
            )
        self.config_path: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.already_saved:
            self.config_path = run_dir(trainer) / self.file_name(stage)  # collective: every rank
        super().setup(trainer, pl_module, stage)

    def file_name(self, stage: str) -> str:
        """``config.yaml`` for ``fit``, else ``<stage>_config.yaml`` (``config_filename`` as set)."""
        stage = _stage_name(stage)
        return self.config_filename if stage == "fit" else f"{stage}_{self.config_filename}"

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Rank 0: write the resolved config into the run folder and log it."""
        assert self.config_path is not None
        inputs = input_config_files(self.config, self.command_line)
        wanted = self.config_path
        self.config_path = next(path for path in _candidates(wanted, stage) if path.resolve() not in inputs)
        if self.config_path != wanted:
            rank_zero_info(
                f"{wanted} is a config file this run was started with and is kept as it is: the resolved "
                f"config is saved as {self.config_path}"
            )
        dumped = self.parser.dump(self.config, **_KEEP_NONE)
        atomic_write_bytes(dumped.encode(), self.config_path)
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": yaml.safe_load(dumped)})


def _stage_name(stage: Any) -> str:
    """``"test"`` for ``TrainerFn.TESTING`` (what Lightning passes to ``setup``) and for ``"test"``."""
    return str(getattr(stage, "value", stage))


def _candidates(path: Path, stage: Any) -> Iterator[Path]:
    """``path``, then ``<stage>_config.yaml`` beside it, then ``<stage>_config_1.yaml``, ..."""
    yield path
    stage = _stage_name(stage)
    stem = path.stem if path.stem.startswith(f"{stage}_") else f"{stage}_{path.stem}"
    yield path.with_name(f"{stem}{path.suffix}")
    number = 1
    while True:
        yield path.with_name(f"{stem}_{number}{path.suffix}")
        number += 1
