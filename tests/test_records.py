"""Every run keeps its own record: config and plots in a per-run folder, the full config in the logger."""

from __future__ import annotations

from pathlib import Path

import pytest
import wandb
import yaml

from lightning_tricks import run_dir
from lightning_tricks.cli import build_cli

CONFIGS = Path(__file__).parents[1] / "configs"
TINY_FIT = [
    "fit",
    f"--config={CONFIGS / 'digits.yaml'}",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--test_after_fit=false",
    "--model.init_args.model=small_cnn",
    "--model.init_args.scheduler=null",
    "--data.init_args.image_size=8",
]
LR_FINDER = "--trainer.callbacks+={class_path: LRFinder, init_args: {num_steps: 12, apply: false}}"


def test_two_wandb_runs_keep_distinct_config_and_plot_files():
    runs = []
    for seed in (1, 2):
        cli = build_cli(
            [
                *TINY_FIT,
                f"--config={CONFIGS / 'logger' / 'wandb.yaml'}",
                f"--seed_everything={seed}",
                LR_FINDER,
            ]
        )
        folder = run_dir(cli.trainer)
        # The W&B run's config holds the whole resolved configuration, not only the model's settings.
        logged = cli.trainer.logger.experiment.config.as_dict()["config"]
        assert logged["seed_everything"] == seed
        assert logged["data"]["class_path"] == "lightning_tricks.datamodules.DigitsDataModule"
        assert logged["trainer"]["max_epochs"] == 1
        callbacks = [callback["class_path"] for callback in logged["trainer"]["callbacks"]]
        assert "lightning.pytorch.callbacks.ModelCheckpoint" in callbacks
        assert "lightning_tricks.callbacks.LRFinder" in callbacks
        wandb.finish()  # what the end of a `lightning-tricks` process does
        runs.append(folder)

    first, second = runs
    assert first != second
    for seed, folder in zip((1, 2), runs, strict=True):
        assert folder.parent.resolve() == Path("runs/wandb/wandb").resolve()
        assert folder.name.startswith("offline-run-")
        assert yaml.safe_load((folder / "config.yaml").read_text())["seed_everything"] == seed
        assert (folder / "lr_finder.png").stat().st_size > 0
    # the shared save_dir holds no run's files, so nothing there can be overwritten by the next run
    assert not Path("runs/wandb/config.yaml").exists()
    assert not Path("runs/wandb/lr_finder.png").exists()


@pytest.mark.parametrize(
    "logger", ["lightning.pytorch.loggers.CSVLogger", "lightning.pytorch.loggers.TensorBoardLogger"]
)
def test_csv_and_tensorboard_runs_keep_config_in_versioned_folders(logger):
    folders = []
    for epochs in (1, 2):
        cli = build_cli(
            [
                *TINY_FIT,
                f"--trainer.logger={{class_path: {logger}, init_args: {{save_dir: runs}}}}",
                f"--trainer.max_epochs={epochs}",
            ]
        )
        folder = run_dir(cli.trainer)
        assert folder == Path(cli.trainer.logger.log_dir)
        assert yaml.safe_load((folder / "config.yaml").read_text())["trainer"]["max_epochs"] == epochs
        hparams = yaml.safe_load((folder / "hparams.yaml").read_text())
        assert hparams["config"]["trainer"]["max_epochs"] == epochs
        assert hparams["config"]["model"]["init_args"]["model"] == "small_cnn"
        # Lightning's own record of the module's hyperparameters is still there beside it
        assert hparams["model"] == "small_cnn"
        folders.append(folder)
    assert [folder.name for folder in folders] == ["version_0", "version_1"]


def test_run_dir_without_logger_is_the_default_root_dir(tmp_path):
    no_logger = ["--trainer.logger=false", "--trainer.callbacks=[ModelCheckpoint]"]
    cli = build_cli([*TINY_FIT, *no_logger, f"--trainer.default_root_dir={tmp_path / 'plain'}"])
    assert run_dir(cli.trainer) == tmp_path / "plain"
    assert yaml.safe_load((tmp_path / "plain" / "config.yaml").read_text())["trainer"]["logger"] is False
