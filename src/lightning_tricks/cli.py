"""The ``lightning-tricks`` command: LightningCLI with the project's models, data and callbacks.

Example::

    lightning-tricks fit --config configs/digits.yaml            # trains, then tests the best checkpoint
    lightning-tricks fit --config configs/digits.yaml --print_config
    lightning-tricks fit --model ImageClassifier --model.model resnet20 --data DigitsDataModule \\
        --data.image_size 32 --trainer.callbacks+=EMA --trainer.max_epochs 5

Models, DataModules and callbacks are chosen by ``class_path`` or by their short class name:
importing the packages below makes every project class known to the parser by name.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.rank_zero import rank_zero_info

import lightning_tricks.callbacks
import lightning_tricks.datamodules
import lightning_tricks.recipes  # noqa: F401  (registers the recipe for short names)
from lightning_tricks import cli_help
from lightning_tricks._cli_checkpoint import (
    check_linked_args,
    checkpoint_hparams,
    class_path_for_bare_hparams,
    reconcile_model_config,
)
from lightning_tricks._cli_checks import check_run_config
from lightning_tricks._cli_errors import ConfigError, pop_debug_flag, run_reporting_errors
from lightning_tricks._lightning_compat import CheckpointHparamsHook
from lightning_tricks.callbacks import PredictionCSVWriter
from lightning_tricks.callbacks.final_weights import weights_for_test_after_fit
from lightning_tricks.composition import replaced_callbacks
from lightning_tricks.console import console_callbacks, silence_third_party_noise
from lightning_tricks.fit_summary import FitSummary
from lightning_tricks.records import RunConfigSaver

# `predict` writes its predictions here (in the run's folder) unless `--predictions_file null`.
PREDICTIONS_FILE = "predictions.csv"

# Model init args linked from the DataModule when the classes are built.
LINKED_MODEL_ARGS = ("num_classes", "in_channels")


class LightningTricksCLI(CheckpointHparamsHook, LightningCLI):
    """LightningCLI that links data shapes into the model and can test right after fitting.

    With ``--ckpt_path FILE`` the model is rebuilt from the checkpoint's hyper-parameters, as in any
    LightningCLI, but the model values the user gave are not dropped silently: run settings (``tta``,
    ...) apply, a different network is refused, and ignored training settings are warned about
    (refused when resuming ``fit``); see :mod:`lightning_tricks._cli_checkpoint`.
    """

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """The main and every subcommand parser, refusing abbreviated options.

        argparse takes a unique prefix for the full option (``--trainer.max_epoch`` for
        ``--trainer.max_epochs``); here it is an unknown option with a did-you-mean suggestion.
        """
        kwargs.setdefault("allow_abbrev", False)
        parser = super().init_parser(**kwargs)
        # error messages suggest the closest option of these parsers for a misspelt config-file key
        self.option_parsers = [*getattr(self, "option_parsers", []), parser]
        return parser

    def setup_parser(self, add_subcommands: bool, main_kwargs: dict, subparser_kwargs: dict) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        self.parser.add_argument("--version", action="version", version=cli_help.version())

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help=(
                "After `fit`, run `test` on the final model's weights: restored best weights, else the "
                "best checkpoint, else the last weights (printed before testing)."
            ),
        )
        parser.add_argument(
            "--predictions_file",
            type=str | None,
            default=PREDICTIONS_FILE,
            help=(
                "`predict` only: write index, predicted class, its probability and the label (when the "
                "data has one) as this CSV file, relative to the run's folder; null: write nothing."
            ),
        )
        for name in LINKED_MODEL_ARGS:
            parser.link_arguments(f"data.{name}", f"model.init_args.{name}", apply_on="instantiate")

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        super().parse_arguments(parser, args)
        self._parsed_args = args
        saver = self.save_config_callback
        command_line = sys.argv[1:] if args is None else args
        if isinstance(saver, type) and issubclass(saver, RunConfigSaver) and isinstance(command_line, list):
            # a list read from a file (`--trainer.callbacks cbs.yaml`) keeps no trace in the parsed config
            self.save_config_kwargs = {**self.save_config_kwargs, "command_line": list(command_line)}

    def given_config(self) -> Namespace:
        """The config as the user wrote it (files and command line), without the defaults."""
        args = self._parsed_args
        if isinstance(args, (dict, Namespace)):
            return self.parser.parse_object(args, defaults=False)
        return self.parser.parse_args(args, defaults=False)

    def reconcile_checkpoint_hparams(self, merge: Callable[[], None]) -> None:
        """Lightning's merge of the ``--ckpt_path`` hyper-parameters, then the given values' check.

        A checkpoint saved without the model's class path (a plain ``Trainer.fit``) is merged into the
        configured ``model.class_path`` when its hyper-parameters fit that class.
        """
        subcommand = self.config.get("subcommand")
        ckpt_path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not ckpt_path or not Path(ckpt_path).is_file():
            return merge()
        before = self.config.clone()
        saved = checkpoint_hparams(ckpt_path)
        configured = before[subcommand].get("model.class_path")
        if saved and "_class_path" not in saved and isinstance(configured, str):
            class_path = class_path_for_bare_hparams(str(ckpt_path), saved, configured)
            self.merge_checkpoint_hparams(subcommand, saved, class_path)
        else:
            merge()
        if saved:
            self._reconcile(subcommand, str(ckpt_path), saved, before[subcommand], self.config[subcommand])

    def after_instantiate_classes(self) -> None:
        if self.subcommand is None:
            return
        config = self.config_init[self.subcommand]
        requested = config.get("ckpt_path")
        check_run_config(self)  # resolves `--ckpt_path last` to a file
        if requested == "last" and config.get("ckpt_path"):
            # Lightning merged nothing for `last`: the model follows the config; refuse what cannot resume.
            ckpt_path = config["ckpt_path"]
            self._reconcile(
                self.subcommand, ckpt_path, checkpoint_hparams(ckpt_path), self.config[self.subcommand], None
            )
        ckpt_path, saved = getattr(self, "_checkpoint_hparams", (None, {}))
        if saved:
            check_linked_args(self.model, saved, ckpt_path, LINKED_MODEL_ARGS)

    def _reconcile(
        self, subcommand: str, ckpt_path: str, saved: dict[str, Any], before: Any, merged: Any | None
    ) -> None:
        """Keep the checkpoint's hyper-parameters (checked against the built model's linked args once it
        exists) and reconcile the model values the user gave with them (see ``reconcile_model_config``)."""
        self._checkpoint_hparams = (ckpt_path, saved)
        reconcile_model_config(
            subcommand,
            ckpt_path,
            self.given_config()[subcommand],
            before,
            merged,
            saved,
            linked=LINKED_MODEL_ARGS,
        )

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for replaced in replaced_callbacks(config.get("config") or []):
            rank_zero_warn(replaced.message())

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The configured Trainer plus the command's progress bar, model summary and end-of-fit summary."""
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init)["trainer"]
        configured = config.get("callbacks") or []
        configured = list(configured) if isinstance(configured, list) else [configured]
        added = console_callbacks(
            configured, config.get("enable_progress_bar"), config.get("enable_model_summary")
        )
        if self.subcommand == "predict":
            configured = predict_callbacks(configured, self.config_init["predict"].get("predictions_file"))
            # A ModelCheckpoint restored from --ckpt_path in a new run folder warns that its best-model
            # record is not reloaded; `predict` saves no checkpoint, so that record is irrelevant there.
            warnings.filterwarnings("ignore", message=r"The dirpath has changed from", category=UserWarning)
        kwargs.setdefault("callbacks", [*configured, *added, FitSummary()])
        return super().instantiate_trainer(**kwargs)

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        ckpt_path, description = weights_for_test_after_fit(self.trainer)
        rank_zero_info(f"Testing {description}.")
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def predict_callbacks(configured: list[Callback], predictions_file: str | None) -> list[Callback]:
    """The configured callbacks for ``predict``, plus a :class:`PredictionCSVWriter` for
    ``predictions_file`` unless it is ``None`` or a prediction writer is configured."""
    if predictions_file is None or any(isinstance(c, BasePredictionWriter) for c in configured):
        return configured
    try:
        writer = PredictionCSVWriter(predictions_file)
    except ValueError as err:  # the writer's own check, reported against the console option
        raise ConfigError(
            "predictions_file",
            predictions_file,
            f"cannot be written: {err}",
            "--predictions_file=predictions.csv (inside the run's folder), or null to write no file",
        ) from err
    return [*configured, writer]


def build_cli(
    args: list[str] | None = None,
    run: bool = True,
    exit_on_error: bool = True,
    cli_class: type[LightningTricksCLI] = LightningTricksCLI,
    **cli_kwargs: Any,
) -> LightningTricksCLI:
    """Parse ``args`` (default: ``sys.argv``), build the classes and, with ``run``, run the subcommand.

    ``exit_on_error=False`` raises command-line errors (``argparse.ArgumentError``) instead of exiting.
    """
    silence_third_party_noise()
    parser_kwargs = {"exit_on_error": exit_on_error}
    return cli_class(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_callback=RunConfigSaver,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={
            **parser_kwargs,
            "description": cli_help.DESCRIPTION,
            "epilog": cli_help.epilog(),
            "formatter_class": cli_help.HelpFormatter,
            **{name: dict(parser_kwargs) for name in LightningCLI.subcommands()},
        },
        args=args,
        run=run,
        **cli_kwargs,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-tricks`` console script and ``python -m lightning_tricks``.

    Errors end in a short message naming the config key and a fix; ``--debug`` (or the environment
    variable ``LIGHTNING_TRICKS_DEBUG=1``) shows the traceback instead.
    """
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in ("search", "ablate"):
        from lightning_tricks.experiments.cli import main as experiments_main

        return experiments_main(argv)
    args, debug = pop_debug_flag(args)
    try:
        run_reporting_errors(lambda: build_cli(args, exit_on_error=False), debug=debug)
    finally:
        # Lightning destroys NCCL groups at exit but not gloo ones (CPU DDP), whose threads can
        # then abort the process at interpreter shutdown.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
