"""The command line: end-to-end training on real digits, and bad configuration failing at start-up."""

from __future__ import annotations

import contextlib
import io
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import DDP_TIMEOUT

from lightning_tricks import run_dir
from lightning_tricks.callbacks import PredictionCSVWriter
from lightning_tricks.cli import build_cli

CONFIGS = Path(__file__).parents[1] / "configs"
FAST = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def run_cli(args: list[str]) -> str:
    """Run the CLI in-process and return everything it reported on failure (message of the error)."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises((SystemExit, ValueError, TypeError)) as info:
        build_cli(args)
    return f"{stderr.getvalue()}\n{info.value}"


def test_cli_trains_and_tests_digits_well_above_chance(tmp_path):
    cli = build_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits.yaml"),
            *FAST,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=2",
            "--model.init_args.model=small_cnn",
            "--model.init_args.scheduler.name=cosine",
            "--data.init_args.image_size=8",
        ]
    )
    # Shapes were linked from the DataModule into the model, not set in YAML.
    assert cli.model.num_classes == 10
    assert cli.model.net(torch.zeros(1, 1, 8, 8)).shape == (1, 10)
    test_acc = cli.trainer.callback_metrics["test/acc"].item()
    assert test_acc > 0.8, f"10-class chance is 0.1; a working recipe reaches far more, got {test_acc}"
    # test ran on the best checkpoint written by the config's ModelCheckpoint
    assert Path(cli.trainer.checkpoint_callback.best_model_path).is_file()
    best = cli.trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(best, weights_only=True)
    assert checkpoint["hyper_parameters"]["model"] == "small_cnn"
    assert "mean" in checkpoint["DigitsDataModule"]["statistics"]

    # The other subcommands rebuild the model from the checkpoint's hyperparameters, given the same
    # settings it was trained with (another network would be refused, see test_cli_checkpoint.py).
    same_data = [
        "--data.init_args.image_size=8",
        "--model.init_args.model=small_cnn",
        "--model.init_args.scheduler.name=cosine",
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tested = build_cli(
            ["test", "--config", str(CONFIGS / "digits.yaml"), *FAST, *same_data, f"--ckpt_path={best}"]
        )
    assert not [w for w in caught if "(checkpoint: " in str(w.message)]  # the fit's config: quiet
    assert type(tested.model.net).__name__ == type(cli.model.net).__name__
    assert tested.trainer.callback_metrics["test/acc"].item() == pytest.approx(test_acc)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predicted = build_cli(
            ["predict", "--config", str(CONFIGS / "digits.yaml"), *FAST, *same_data, f"--ckpt_path={best}"]
        )
    # predict saves no checkpoint: its ModelCheckpoint's best-model record in a new run folder is moot
    assert not [w for w in caught if "dirpath has changed" in str(w.message)]
    probabilities = torch.cat(predicted.trainer.predict_loop.predictions)
    assert probabilities.shape == (360, 10)
    (writer,) = [c for c in predicted.trainer.callbacks if isinstance(c, PredictionCSVWriter)]
    rows = writer.written_path.read_text().splitlines()
    assert len(rows) == 1 + 360 and writer.written_path.parent == run_dir(predicted.trainer)
    assert [int(row.split(",")[1]) for row in rows[1:]] == probabilities.argmax(1).tolist()
    assert torch.allclose(probabilities.sum(1), torch.ones(360))


def test_print_config_lists_recipe_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", str(CONFIGS / "digits.yaml"), "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "lightning_tricks.recipes.ImageClassifier" in printed
    assert "nesterov: true" in printed


def test_short_class_names_resolve():
    cli = build_cli(
        [
            "--model=ImageClassifier",
            "--data=DigitsDataModule",
            "--model.init_args.model=mlp",
            "--model.init_args.model_kwargs={input_size: 8}",
            *FAST,
        ],
        run=False,
    )
    assert type(cli.model).__name__ == "ImageClassifier"
    assert type(cli.datamodule).__name__ == "DigitsDataModule"
    assert cli.model.hparams.in_channels == 1


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("--model.init_args.model=resnet9000", ["resnet9000", "resnet20"]),
        ("--model.init_args.optimizer.lr=-0.1", ["optimizer.lr"]),
        ("--model.init_args.scheduler.name=warp_drive", ["warp_drive", "cosine"]),
        ("--model.init_args.regularization.dropout=1.5", ["regularization.dropout"]),
        ("--model.init_args.optimizer.name=sgdd", ["sgdd", "adamw"]),
    ],
)
def test_bad_configuration_fails_at_startup_naming_the_parameter(override, names):
    message = run_cli(["fit", "--config", str(CONFIGS / "digits.yaml"), override, *FAST])
    for name in names:
        assert name in message, f"{name!r} missing from the error:\n{message}"


def test_expected_initial_loss_is_ln_classes():
    # Guards the quickstart's metric scale: an untrained zero-initialised head gives CE = ln(10).
    cli = build_cli(["--config", str(CONFIGS / "digits.yaml"), *FAST], run=False)
    logits = torch.zeros(4, cli.model.num_classes)
    loss = cli.model.data_loss(logits, torch.tensor([0, 1, 2, 3]))
    assert loss.item() == pytest.approx(math.log(10), rel=1e-6)
    # ...and the loss reads each sample's own label: against -log softmax at the target, by hand
    logits = torch.randn(10, 10, generator=torch.Generator().manual_seed(0)) * 3
    targets = torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    expected = (logits.exp().sum(1).log() - logits[torch.arange(10), targets]).mean()
    assert cli.model.data_loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-5)


@pytest.mark.ddp
def test_console_command_runs_two_cpu_processes_with_offline_wandb(tmp_path):
    """The real console entry point with the DDP and W&B fragments: the linear scaling rule counts
    both processes, and W&B writes an offline run without any login."""
    command = [
        sys.executable,
        "-m",
        "lightning_tricks",
        "fit",
        f"--config={CONFIGS / 'digits.yaml'}",
        f"--config={CONFIGS / 'trainer' / 'ddp_cpu.yaml'}",
        f"--config={CONFIGS / 'logger' / 'wandb.yaml'}",
        "--trainer.max_epochs=2",
        "--trainer.enable_progress_bar=false",
        "--trainer.callbacks=[{class_path: ModelCheckpoint, init_args: {save_last: true}}]",
        "--model.init_args.model=small_cnn",
        "--model.init_args.scheduler.name=null",
        "--model.init_args.optimizer.lr=0.01",
        "--model.init_args.optimizer.base_batch_size=64",
        "--data.init_args.image_size=8",
    ]
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (last,) = tmp_path.glob("runs/**/last.ckpt")
    checkpoint = torch.load(last, weights_only=True)
    # lr x (64 per process x 2 processes) / 64
    assert checkpoint["optimizer_states"][0]["param_groups"][0]["lr"] == pytest.approx(0.02)
    assert list(tmp_path.glob("runs/wandb/wandb/offline-run-*")), "no offline W&B run was written"
    assert "test/acc" in result.stdout
