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
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

import lightning_tricks.callbacks
import lightning_tricks.datamodules
import lightning_tricks.recipes  # noqa: F401  (registers the recipe for short names)


class LightningTricksCLI(LightningCLI):
    """LightningCLI that links data shapes into the model and can test right after fitting."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="After `fit`, run `test` on the best checkpoint (or the last weights without one).",
        )
        parser.link_arguments("data.num_classes", "model.init_args.num_classes", apply_on="instantiate")
        parser.link_arguments("data.in_channels", "model.init_args.in_channels", apply_on="instantiate")

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit", True):
            return
        checkpoint = self.trainer.checkpoint_callback
        ckpt_path = "best" if checkpoint is not None and checkpoint.best_model_path else None
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=ckpt_path)


def build_cli(
    args: list[str] | None = None,
    run: bool = True,
    cli_class: type[LightningTricksCLI] = LightningTricksCLI,
    **cli_kwargs: Any,
) -> LightningTricksCLI:
    """Parse ``args`` (default: ``sys.argv``), build the classes and, with ``run``, run the subcommand."""
    return cli_class(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        **cli_kwargs,
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``lightning-tricks`` console script and ``python -m lightning_tricks``."""
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] in ("search", "ablate"):
        from lightning_tricks.experiments.cli import main as experiments_main

        return experiments_main(argv)
    try:
        build_cli(args)
    finally:
        # Lightning destroys NCCL groups at exit but not gloo ones (CPU DDP), whose threads can
        # then abort the process at interpreter shutdown.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
