"""The console: --help, --version, no third-party noise, progress lines in a file, the end-of-fit summary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import PlainClassifier, digits_loaders, quiet_trainer_kwargs
from lightning.pytorch.callbacks import ModelCheckpoint, TQDMProgressBar

import lightning_tricks
from lightning_tricks.cli import build_cli
from lightning_tricks.console import (
    PlainProgressBar,
    QuietModelSummary,
    QuietRichProgressBar,
    console_callbacks,
)
from lightning_tricks.fit_summary import FitSummary

CONFIGS = Path(__file__).parents[1] / "configs"


def test_help_lists_subcommands_configs_names_and_examples(capsys):
    with pytest.raises(SystemExit) as info:
        build_cli(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for expected in ("fit", "validate", "test", "predict", "--version"):
        assert expected in text
    assert "lightning-tricks fit --config configs/digits.yaml" in text
    shipped = {str(path.relative_to(CONFIGS.parent)) for path in CONFIGS.rglob("*.yaml")}
    assert shipped and all(path in text for path in shipped)
    for name in ("resnet20", "wrn_28_10", "DigitsDataModule", "EMA", "LRFinder"):
        assert name in text


def test_help_lists_no_abstract_datamodule_base(capsys):
    import inspect

    import lightning_tricks.datamodules as datamodules

    with pytest.raises(SystemExit):
        build_cli(["--help"])
    text = capsys.readouterr().out
    block = text.split("  data:", 1)[1].split("  callbacks:", 1)[0]
    listed = [name.strip() for name in block.replace("\n", " ").split(",")]
    concrete = [
        name
        for name in datamodules.__all__
        if name.endswith("DataModule") and not inspect.isabstract(getattr(datamodules, name))
    ]
    assert sorted(listed) == sorted(concrete)
    assert "InMemoryImageDataModule" not in listed and "PreprocessedImageDataModule" not in listed


def test_version_prints_the_package_version(capsys):
    with pytest.raises(SystemExit) as info:
        build_cli(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.startswith(f"lightning-tricks {lightning_tricks.__version__} (lightning ")


def test_console_command_to_a_file_prints_progress_lines_and_a_summary_without_noise(tmp_path):
    """The real console entry point, stdout and stderr to a file (not a terminal)."""
    log = tmp_path / "out.txt"
    command = [
        sys.executable,
        "-m",
        "lightning_tricks",
        "fit",
        f"--config={CONFIGS / 'digits.yaml'}",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        "--test_after_fit=false",
        "--model.init_args.model=small_cnn",
        "--data.init_args.image_size=8",
    ]
    with log.open("w") as out:
        result = subprocess.run(command, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, timeout=240)
    text = log.read_text()
    assert result.returncode == 0, text[-3000:]
    # Lightning 2.6 and torch 2.14 print each of these by default
    for noise in ("💡 Tip", "litlogger", "LeafSpec", "FLOPs", "v_num", "Trainer already configured"):
        assert noise not in text, f"{noise!r} printed:\n{text}"
    epoch_lines = [line for line in text.splitlines() if line.startswith("epoch ")]
    assert [line.split("  ")[:2] for line in epoch_lines] == [["epoch 1/2", "done"], ["epoch 2/2", "done"]]
    assert all("val/acc" in line for line in epoch_lines)
    (config,) = tmp_path.glob("runs/digits/lightning_logs/version_0/config.yaml")
    for row in ("best val/acc (max)", "best checkpoint", "final val/acc", "final weights", "run folder"):
        assert row in text
    assert str(config.relative_to(tmp_path)) in text


def test_plain_progress_bar_prints_a_line_per_batch_and_per_epoch(tmp_path, capsys):
    train, val = digits_loaders(batch_size=400)
    kwargs = {**quiet_trainer_kwargs(tmp_path), "enable_progress_bar": True}
    trainer = L.Trainer(**kwargs, max_epochs=2, callbacks=[PlainProgressBar(every_n_seconds=0)])
    trainer.fit(PlainClassifier(), train, val)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    batches = len(train)  # 1200 / 400
    assert len(lines) == 2 * (batches + 1)
    assert lines[0].startswith(f"epoch 1/2  step 1/{batches}  ")
    assert lines[batches].startswith("epoch 1/2  done  ")
    assert "val/loss" in lines[-1] and "v_num" not in "".join(lines)


def test_plain_progress_bar_rejects_a_negative_interval():
    with pytest.raises(ValueError, match="every_n_seconds"):
        PlainProgressBar(every_n_seconds=-1)


@pytest.mark.parametrize("example_input", [False, True])
def test_model_summary_shows_flops_only_when_they_were_counted(tmp_path, capsys, example_input):
    model = PlainClassifier()
    if example_input:
        model.example_input_array = torch.zeros(1, 1, 8, 8)
    train, val = digits_loaders(batch_size=400)
    kwargs = {**quiet_trainer_kwargs(tmp_path), "enable_model_summary": True}
    trainer = L.Trainer(**kwargs, max_steps=1, limit_val_batches=0, callbacks=[QuietModelSummary()])
    trainer.fit(model, train, val)
    text = capsys.readouterr().out
    assert "Total params" in text
    # 64*64 + 64*10 multiply-adds = 4736 MACs = 9.5 K FLOPs for one sample
    assert ("Total FLOPs: 9.5 K" in text) == example_input
    assert ("FLOPs" in text) == example_input


def test_console_callbacks_follow_the_trainer_config(monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert [type(c) for c in console_callbacks([], None, None)] == [PlainProgressBar, QuietModelSummary]
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert [type(c) for c in console_callbacks([], True, False)] == [QuietRichProgressBar]
    assert console_callbacks([], False, False) == []
    assert console_callbacks([TQDMProgressBar(), QuietModelSummary()], True, True) == []


def test_fit_summary_reports_best_and_final_metrics_checkpoints_and_weights(tmp_path, capsys):
    train, val = digits_loaders(batch_size=200)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max", save_last=True)
    summary = FitSummary(final_weights=lambda trainer: f"raw weights after step {trainer.global_step}")
    kwargs = {**quiet_trainer_kwargs(tmp_path), "enable_checkpointing": True}
    trainer = L.Trainer(**kwargs, max_epochs=2, callbacks=[checkpoint, summary])
    trainer.fit(PlainClassifier(), train, val)
    rows = dict(summary.rows)
    assert rows["best val/acc (max)"] == f"{checkpoint.best_model_score.item():.4g}"
    assert Path(rows["best checkpoint"]).is_file() and Path(rows["last checkpoint"]).is_file()
    assert rows["final val/loss"] == f"{trainer.callback_metrics['val/loss'].item():.4g}"
    assert rows["final train/loss"] == f"{trainer.callback_metrics['train/loss_epoch'].item():.4g}"
    assert rows["final weights"] == f"raw weights after step {trainer.global_step}"
    assert rows["run folder"] == str(tmp_path)  # no logger: the default root dir
    printed = capsys.readouterr().out
    assert "fit ended after 2 epochs" in printed and "best val/acc (max)" in printed


def test_fit_summary_lists_the_run_folders_config_and_plots():
    cli = build_cli(
        [
            "fit",
            f"--config={CONFIGS / 'digits.yaml'}",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            "--trainer.limit_val_batches=1",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--test_after_fit=false",
            "--model.init_args.model=small_cnn",
            "--model.init_args.scheduler=null",
            "--data.init_args.image_size=8",
            "--trainer.callbacks+={class_path: LRFinder, init_args: {num_steps: 12, apply: false}}",
        ]
    )
    (summary,) = [callback for callback in cli.trainer.callbacks if isinstance(callback, FitSummary)]
    folder = Path(dict(summary.rows)["run folder"])
    assert folder == Path(cli.trainer.logger.log_dir)
    assert ("config", str(folder / "config.yaml")) in summary.rows
    assert ("plot", str(folder / "lr_finder.png")) in summary.rows
    assert (folder / "config.yaml").is_file() and (folder / "lr_finder.png").is_file()
