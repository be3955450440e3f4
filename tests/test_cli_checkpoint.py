"""`test`/`fit --ckpt_path FILE`: the model values the user gives are applied, refused or warned about.

One tiny digits checkpoint (small_cnn, SGD lr 0.05, two steps) is shared by the module's tests.
"""

from __future__ import annotations

import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import (
    PlainClassifier,
    digits_loaders,
    quiet_trainer_kwargs,
    record_calls,
    write_digits_recipe_config,
)

from lightning_tricks._cli_checkpoint import differences
from lightning_tricks.cli import build_cli, main
from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.recipes import GradientClippingConfig, ImageClassifier, RegularizationConfig

FIT_MODEL = {"model": "small_cnn", "optimizer": {"name": "sgd", "lr": 0.05}}
# Each test writes into its own folder (its working directory), never beside the shared config.
QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.limit_test_batches=2",
    "--trainer.default_root_dir=out",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, str, str]:
    """``(fit config, the run's saved full config, checkpoint)`` of one short digits run."""
    root = tmp_path_factory.mktemp("fit")
    (root / "input").mkdir()
    config = write_digits_recipe_config(root / "input", FIT_MODEL, max_epochs=1, enable_checkpointing=True)
    build_cli(["fit", "--config", config, f"--trainer.default_root_dir={root}/run"])
    (ckpt,) = (root / "run").rglob("*.ckpt")
    saved = root / "saved.yaml"
    shutil.copy(root / "run" / "config.yaml", saved)  # the full resolved config the run recorded
    return config, str(saved), str(ckpt)


@pytest.fixture
def evaluated(monkeypatch) -> list[str]:
    """Stages of the recipe's evaluation steps that ran (stays empty when nothing runs)."""
    return record_calls(monkeypatch, ImageClassifier, "_evaluate", argument=1)


def run_test(config: str, ckpt: str, *extra: str, subcommand: str = "test"):
    return build_cli([subcommand, "--config", config, f"--ckpt_path={ckpt}", *QUIET, *extra])


def ours(caught: list[warnings.WarningMessage]) -> list[str]:
    """The warnings about given model values that differ from the checkpoint's."""
    return [str(w.message) for w in caught if "(checkpoint: " in str(w.message)]


def run_main(args: list[str], capsys) -> tuple[int | str | None, list[str]]:
    with pytest.raises(SystemExit) as info:
        main(args)
    return info.value.code, [line for line in capsys.readouterr().err.splitlines() if line.strip()][-3:]


@pytest.mark.parametrize("which", ["fit config", "saved run config"])
def test_the_config_the_checkpoint_was_trained_with_passes_quietly(trained, which, caplog):
    config = trained[0] if which == "fit config" else trained[1]
    with warnings.catch_warnings(record=True) as caught, caplog.at_level("INFO"):
        warnings.simplefilter("always")
        cli = run_test(config, trained[2])
    assert ours(caught) == [] and "not the checkpoint" not in caplog.text
    saved = torch.load(trained[2], weights_only=True)["hyper_parameters"]
    assert (
        cli.model.optimizer_config.momentum == saved["optimizer"]["momentum"] == 0.9
    )  # resolved SGD default
    assert cli.model.tta == [] and "test/acc" in cli.trainer.callback_metrics


def test_tta_given_at_test_time_is_applied_to_the_checkpoint(trained, caplog):
    config, _, ckpt = trained
    plain = run_test(config, ckpt).trainer.callback_metrics["test/acc"].item()
    with caplog.at_level("INFO"):
        cli = run_test(config, ckpt, "--model.init_args.tta=[hflip]", "--model.init_args.channels_last=true")
    assert torch.load(ckpt, weights_only=True)["hyper_parameters"]["tta"] is None
    assert cli.model.tta == ["hflip"] and cli.model.channels_last is True
    metrics = cli.trainer.callback_metrics
    assert "test/acc_tta_hflip" in metrics
    assert metrics["test/acc"].item() == pytest.approx(plain)  # the checkpoint's weights, as without TTA
    (line,) = [line for line in caplog.text.splitlines() if "not the checkpoint" in line]
    assert (
        "test: from the config, not the checkpoint: model.init_args.tta=['hflip'] (checkpoint: None)" in line
    )
    assert "model.init_args.channels_last=True (checkpoint: False)" in line


@pytest.mark.parametrize(
    ("option", "expected"),
    [
        (
            "--model.init_args.model=mlp",
            "model.init_args.model='mlp' differs from the checkpoint's 'small_cnn'",
        ),
        (
            "--model.init_args.model_kwargs={widths: [8, 16]}",
            "model.init_args.model_kwargs={'widths': [8, 16]} differs from the checkpoint's None",
        ),
    ],
)
def test_a_different_network_is_refused_before_anything_runs(trained, option, expected, capsys, evaluated):
    config, _, ckpt = trained
    status, tail = run_main(["test", "--config", config, f"--ckpt_path={ckpt}", *QUIET, option], capsys)
    assert status == 1 and evaluated == []
    assert tail[0].startswith(f"error: {expected}") and ckpt in tail[0]
    assert "changes the network whose weights the checkpoint holds" in tail[0]
    assert (
        tail[1].startswith("  fix: set model.init_args.") and "or pass a checkpoint trained with" in tail[1]
    )
    assert "Traceback" not in "\n".join(tail)


def test_a_different_training_setting_warns_and_keeps_the_checkpoints(trained):
    config, _, ckpt = trained
    with pytest.warns(UserWarning, match=r"keeps the checkpoint's training settings") as caught:
        cli = run_test(
            config, ckpt, "--model.init_args.optimizer.lr=0.2", "--model.init_args.loss=multi_margin"
        )
    (message,) = ours(caught)
    assert "model.init_args.optimizer.lr=0.2 (checkpoint: 0.05)" in message
    assert "model.init_args.loss='multi_margin' (checkpoint: 'cross_entropy')" in message
    assert cli.model.optimizer_config.lr == 0.05 and cli.model.loss == "cross_entropy"


def test_resuming_with_a_different_training_setting_is_refused(trained, capsys, monkeypatch):
    config, _, ckpt = trained
    steps: list[int] = []
    monkeypatch.setattr(ImageClassifier, "on_train_batch_start", lambda self, *args: steps.append(1))
    args = ["fit", "--config", config, f"--ckpt_path={ckpt}", "--trainer.max_epochs=2", *QUIET]
    status, tail = run_main([*args, "--model.init_args.optimizer.lr=0.2"], capsys)
    assert status == 1 and steps == [], tail
    assert tail[0].startswith("error: model.init_args.optimizer.lr=0.2 differs from the checkpoint's 0.05")
    assert "a resumed run continues with the checkpoint's training settings" in tail[0]
    assert "would not go on as if never stopped" in tail[0]
    assert tail[1] == (
        "  fix: set model.init_args.optimizer.lr=0.05 (or leave it out) to resume the run as it was, or "
        f"start a new run from these weights: model.init_args.pretrained={ckpt} without --ckpt_path"
    )


def test_plain_lightning_module_keeps_lightnings_rule_with_a_warning(tmp_path):
    train, _ = digits_loaders(batch_size=64)
    trainer = L.Trainer(max_steps=1, limit_val_batches=0, **quiet_trainer_kwargs(tmp_path))
    trainer.fit(PlainClassifier(hidden=16), train)
    ckpt = tmp_path / "plain.ckpt"
    trainer.save_checkpoint(ckpt)
    checkpoint = torch.load(ckpt, weights_only=True)  # as LightningCLI's fit saves it: with the class path
    checkpoint["hyper_parameters"]["_class_path"] = "helpers.PlainClassifier"
    torch.save(checkpoint, ckpt)
    args = [
        "test",
        "--model=helpers.PlainClassifier",
        "--model.init_args.hidden=32",
        "--data=DigitsDataModule",
    ]
    with pytest.warns(UserWarning, match=r"Lightning's rule") as caught:
        cli = build_cli(
            [*args, "--data.image_size=8", "--trainer.logger=false", f"--ckpt_path={ckpt}", *QUIET]
        )
    assert ours(caught) and "model.init_args.hidden=32 (checkpoint: 16)" in ours(caught)[0]
    assert cli.model.hparams.hidden == 16 and "test/acc" in cli.trainer.callback_metrics


def test_ckpt_path_last_refuses_what_the_checkpoint_cannot_resume(trained, capsys, evaluated):
    config, _, ckpt = trained
    Path("out").mkdir()
    shutil.copy(ckpt, "out/last.ckpt")  # found by `--ckpt_path last` under default_root_dir
    base = ["--config", config, "--ckpt_path=last", *QUIET]
    status, tail = run_main(["test", *base, "--model.init_args.model=mlp"], capsys)
    assert status == 1 and evaluated == []
    assert tail[0].startswith("error: model.init_args.model='mlp' differs from the checkpoint's 'small_cnn'")
    status, tail = run_main(
        ["fit", *base, "--trainer.max_epochs=2", "--model.init_args.optimizer.lr=0.2"], capsys
    )
    assert status == 1 and evaluated == []
    assert tail[0].startswith("error: model.init_args.optimizer.lr=0.2 differs from the checkpoint's 0.05")
    assert "last.ckpt" in tail[0] and "as if never stopped" in tail[0]


def test_data_with_another_shape_than_the_checkpoint_is_refused(trained, capsys, evaluated):
    config, _, ckpt = trained
    data = ["--data=SyntheticDataModule", "--data.image_size=8", "--data.num_test=32", "--data.in_channels=3"]
    status, tail = run_main(["test", "--config", config, f"--ckpt_path={ckpt}", *QUIET, *data], capsys)
    assert status == 1 and evaluated == []
    assert tail[0].startswith(
        "error: model.init_args.in_channels=3 (linked from data.in_channels) differs from the checkpoint's 1"
    )
    assert tail[1].startswith("  fix: use the DataModule and data settings the checkpoint was trained with")


def test_null_config_compares_as_its_defaults_but_null_clipping_as_off():
    saved = {
        "regularization": asdict(RegularizationConfig()),
        "gradient_clipping": asdict(GradientClippingConfig()),  # AGC on, with its defaults
        "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    }
    given = {"regularization": None, "gradient_clipping": None, "optimizer": {"name": "sgd", "lr": 0.1}}
    found = differences(given, given, saved, ImageClassifier)
    assert [(diff.key, diff.given, diff.saved) for diff in found] == [
        ("model.init_args.gradient_clipping", None, saved["gradient_clipping"])
    ]


def test_a_rate_the_lr_finder_applied_is_not_a_given_difference(tmp_path, monkeypatch):
    """LRFinder records the rate it applied in the hyper-parameters; the same YAML then still resumes
    the run and tests its checkpoint quietly (the config is compared with the run as configured)."""
    monkeypatch.chdir(tmp_path)
    finder = {
        "class_path": "lightning_tricks.callbacks.LRFinder",
        "init_args": {"num_steps": 10, "min_loss_drop": 0.0, "plot": False},
    }
    config = write_digits_recipe_config(
        tmp_path,
        FIT_MODEL,
        callbacks=[finder],
        max_epochs=1,
        limit_train_batches=12,
        enable_checkpointing=True,
    )
    build_cli(["fit", "--config", config, "--trainer.default_root_dir=run"])
    (ckpt,) = Path("run").rglob("*.ckpt")
    applied = torch.load(ckpt, weights_only=True)["hyper_parameters"]["optimizer"]["lr"]
    assert applied != FIT_MODEL["optimizer"]["lr"]  # the finder rewrote the configured rate
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tested = run_test(config, str(ckpt))
        resumed = build_cli(
            ["fit", "--config", config, f"--ckpt_path={ckpt}", "--trainer.max_epochs=2", *QUIET]
        )
    assert ours(caught) == []
    assert tested.model.optimizer_config.lr == applied == resumed.model.optimizer_config.lr
    assert resumed.trainer.current_epoch == 2


@pytest.fixture(scope="module")
def plain_fit_ckpt(tmp_path_factory) -> str:
    """A checkpoint of the recipe trained by a plain ``Trainer.fit`` (no class path in its hparams)."""
    root = tmp_path_factory.mktemp("plain_fit")
    model = ImageClassifier(**FIT_MODEL, num_classes=10, in_channels=1)
    trainer = L.Trainer(max_steps=2, limit_val_batches=0, **quiet_trainer_kwargs(root))
    trainer.fit(model, DigitsDataModule(image_size=8, batch_size=32))
    trainer.save_checkpoint(root / "plain.ckpt")
    return str(root / "plain.ckpt")


def test_a_plain_trainer_fit_checkpoint_is_tested_as_the_configured_model(trained, plain_fit_ckpt):
    checkpoint = torch.load(plain_fit_ckpt, weights_only=True)
    assert "_class_path" not in checkpoint["hyper_parameters"]
    given = ["--model.init_args.tta=[hflip]", "--model.init_args.optimizer.lr=0.2"]
    with pytest.warns(UserWarning, match=r"keeps the checkpoint's training settings") as caught:
        cli = run_test(trained[0], plain_fit_ckpt, *given)
    assert ours(caught) == [
        "`test` keeps the checkpoint's training settings, which only set how its weights were trained; "
        "ignored given values: model.init_args.optimizer.lr=0.2 (checkpoint: 0.05)"
    ]
    assert type(cli.model) is ImageClassifier and cli.model.tta == ["hflip"]  # a run setting still applies
    assert cli.model.optimizer_config.lr == 0.05 and cli.model.hparams.in_channels == 1
    weights = cli.model.state_dict()
    assert all(torch.equal(weights[name], value) for name, value in checkpoint["state_dict"].items())
    assert "test/acc" in cli.trainer.callback_metrics


def test_a_plain_checkpoint_that_does_not_fit_the_configured_model_is_refused(plain_fit_ckpt, capsys):
    args = ["test", "--model=helpers.PlainClassifier", "--data=DigitsDataModule", "--data.image_size=8"]
    args += ["--trainer.logger=false", f"--ckpt_path={plain_fit_ckpt}", *QUIET]
    status, tail = run_main(args, capsys)
    assert status == 1
    assert tail[0] == (
        f"error: model.class_path='helpers.PlainClassifier' does not fit {plain_fit_ckpt}, which holds no "
        "class path (saved by a plain Trainer.fit): its hyper-parameters channels_last, compile, "
        "gradient_clipping and 12 more are not init arguments of PlainClassifier"
    )
    assert tail[1].startswith("  fix: set model.class_path (e.g. --model ImageClassifier) to the class")
    assert "Parsing of ckpt_path" not in "\n".join(tail)
