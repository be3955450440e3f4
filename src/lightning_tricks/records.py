"""Each run keeps its own record: one folder per run, and the full resolved config in the logger.

Lightning's ``trainer.log_dir`` is a per-run folder for CSV and TensorBoard (``version_N``) but, for
W&B and other loggers, their shared ``save_dir``, where the next run overwrites the previous one's
files. :func:`run_dir` always names the run's own folder; :class:`RunConfigSaver` writes the CLI's
``config.yaml`` there and logs the same config (model, data, trainer, callbacks) as the logger's
hyperparameters under ``config``.

Example::

    from lightning_tricks import run_dir

    class SavePlot(L.Callback):
        def on_fit_end(self, trainer, pl_module):
            folder = run_dir(trainer)  # call on every rank: the folder is broadcast from rank 0
            if trainer.is_global_zero:
                figure.savefig(folder / "plot.png")
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import yaml
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger
from lightning_utilities.core.imports import RequirementCache

__all__ = ["RunConfigSaver", "run_dir"]

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


class RunConfigSaver(SaveConfigCallback):
    """LightningCLI's config saver, writing into :func:`run_dir` and into the loggers' hyperparameters.

    The CLI passes it as ``save_config_callback``; the saved ``config.yaml`` re-runs the same
    experiment with ``lightning-tricks fit --config <run folder>/config.yaml``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["save_to_log_dir"] = False  # written by `save_config` into the run's own folder instead
        super().__init__(*args, **kwargs)
        self.config_path: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not self.already_saved:
            self.config_path = run_dir(trainer) / self.config_filename  # collective: every rank
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Rank 0: write ``config.yaml`` into the run folder and log the resolved config."""
        assert self.config_path is not None
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.parser.save(
            self.config, str(self.config_path), overwrite=True, multifile=self.multifile, **_KEEP_NONE
        )
        resolved = yaml.safe_load(self.parser.dump(self.config, **_KEEP_NONE))
        for logger in trainer.loggers:
            logger.log_hyperparams({"config": resolved})
