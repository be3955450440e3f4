"""Every run keeps its own record: config and plots in a per-run folder, the full config in the logger."""

from __future__ import annotations

from pathlib import Path

import pytest
import wandb
import yaml
from helpers import write_digits_recipe_config
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from lightning_tricks import run_dir
from lightning_tricks.cli import build_cli
from lightning_tricks.fit_summary import FitSummary
from lightning_tricks.records import RunConfigSaver, input_config_files

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


def test_test_in_the_fit_runs_folder_keeps_its_config_and_writes_its_own(tmp_path, caplog):
    run = tmp_path / "run"  # without a logger the run folder is default_root_dir, shared by the subcommands
    no_logger = ["--trainer.logger=false", "--trainer.callbacks=[ModelCheckpoint]"]
    build_cli([*TINY_FIT, *no_logger, f"--trainer.default_root_dir={run}"])
    fit_config = run / "config.yaml"
    original = fit_config.read_bytes()
    assert "verbose" not in yaml.safe_load(original)

    tested = build_cli(["test", f"--config={fit_config}", "--trainer.limit_test_batches=2"])
    assert run_dir(tested.trainer) == run and fit_config.read_bytes() == original
    saved = yaml.safe_load((run / "test_config.yaml").read_text())
    assert saved["trainer"]["limit_test_batches"] == 2 and saved["verbose"] is True
    assert saved["model"]["init_args"]["model"] == "small_cnn"

    # `fit --config` on the fit run's config still parses; that input file is not overwritten either
    with caplog.at_level("INFO"):
        refit = build_cli(["fit", f"--config={fit_config}", "--trainer.max_steps=1"])
    assert fit_config.read_bytes() == original
    assert yaml.safe_load((run / "fit_config.yaml").read_text())["trainer"]["max_steps"] == 1
    assert f"{fit_config} is a config file this run was started with" in caplog.text
    (summary,) = [callback for callback in refit.trainer.callbacks if isinstance(callback, FitSummary)]
    assert ("config", str(run / "fit_config.yaml")) in summary.rows


def test_an_input_config_is_never_overwritten_by_the_subcommands_own(tmp_path):
    user_config = write_digits_recipe_config(tmp_path, {"model": "small_cnn"})  # default_root_dir: tmp_path
    (tmp_path / "test_config.yaml").write_text(Path(user_config).read_text())  # named as a test run's
    given = (tmp_path / "test_config.yaml").read_bytes()
    build_cli(["test", f"--config={tmp_path / 'test_config.yaml'}", "--trainer.limit_test_batches=1"])
    assert (tmp_path / "test_config.yaml").read_bytes() == given
    saved = yaml.safe_load((tmp_path / "test_config_1.yaml").read_text())
    assert saved["trainer"]["limit_test_batches"] == 1 and saved["verbose"] is True
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically, nothing left behind


@pytest.mark.parametrize("kwargs", [{"multifile": True, "overwrite": True}, {"overwrite": False}])
def test_run_config_saver_refuses_options_it_does_not_follow(kwargs):
    with pytest.raises(ValueError, match=r"is not supported: .* use multifile=False, overwrite=True"):
        RunConfigSaver(LightningArgumentParser(), Namespace(), **kwargs)


CHECKPOINT_LIST = "- class_path: ModelCheckpoint\n  init_args: {save_last: true}\n"
EMA_ITEM = "class_path: EMA\ninit_args: {decay: 0.5}\n"


@pytest.mark.parametrize(
    ("content", "options", "expected"),
    [
        # a whole list read from a file: jsonargparse keeps no __path__ for it
        (CHECKPOINT_LIST, ["--trainer.callbacks={}"], {"save_last": True}),
        (EMA_ITEM, ["--trainer.callbacks=[ModelCheckpoint]", "--trainer.callbacks+={}"], {"decay": 0.5}),
    ],
    ids=["list_file", "list_item_file"],
)
def test_a_config_file_given_in_a_callback_list_is_never_overwritten(tmp_path, content, options, expected):
    run = tmp_path / "run"  # without a logger the config is saved to default_root_dir/config.yaml
    run.mkdir()
    callbacks = run / "config.yaml"
    callbacks.write_text(content)
    no_logger = ["--trainer.logger=false", f"--trainer.default_root_dir={run}"]
    build_cli([*TINY_FIT, *no_logger, *(option.format(callbacks) for option in options)])
    assert callbacks.read_text() == content
    saved = yaml.safe_load((run / "fit_config.yaml").read_text())["trainer"]["callbacks"][-1]
    assert saved["init_args"] == {**saved["init_args"], **expected}


def test_config_files_named_inside_a_config_files_lists_count_as_inputs(tmp_path):
    (tmp_path / "item.yaml").write_text("class_path: ModelCheckpoint\ninit_args: {save_last: true}\n")
    (tmp_path / "listed.yaml").write_text(CHECKPOINT_LIST)
    (tmp_path / "items.yaml").write_text("trainer:\n  callbacks:\n    - item.yaml\n")
    (tmp_path / "whole.yaml").write_text("trainer:\n  callbacks: listed.yaml\n")
    for main, listed in (("items.yaml", "item.yaml"), ("whole.yaml", "listed.yaml")):
        main_config = f"--config={tmp_path / main}"
        cli = build_cli([arg for arg in TINY_FIT if arg != "fit"] + [main_config], run=False)
        assert cli.config["trainer"]["callbacks"][-1]["init_args"]["save_last"] is True
        inputs = input_config_files(cli.config)  # the --config file names the others
        assert (tmp_path / listed).resolve() in inputs and (tmp_path / main).resolve() in inputs
