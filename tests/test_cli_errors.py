"""Bad configurations through the real console entry point: a short message naming the key and a fix.

Every case runs ``lightning_tricks.cli.main`` in-process on the digits recipe with a tiny budget and
checks that it exits non-zero, that no training batch ran and no checkpoint or log was written, and
that the last lines of stderr name the config key and a fix (no traceback).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import record_calls

from lightning_tricks.cli import build_cli, main
from lightning_tricks.recipes import ImageClassifier

CONFIG = str(Path(__file__).parents[1] / "configs" / "digits.yaml")
SCHED = "--model.init_args.scheduler"
OPT = "--model.init_args.optimizer"
DATA = "--data.init_args"
CB = "--trainer.callbacks"
TAIL = 4  # what the user sees last: message, fix, debug hint (and one spare line)


def base_args(root: Path) -> list[str]:
    return [
        "fit",
        "--config",
        CONFIG,
        f"--trainer.default_root_dir={root}",
        f"--trainer.logger.init_args.save_dir={root}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--model.init_args.model=small_cnn",
        f"{DATA}.image_size=8",
    ]


@pytest.fixture
def train_batches(monkeypatch) -> list[int]:
    """Indices of the training batches the recipe ran (stays empty when training never starts)."""
    return record_calls(monkeypatch, ImageClassifier, "training_step", argument=1)


def run_main(args: list[str], capsys) -> tuple[int | str | None, list[str]]:
    """Exit status and the last stderr lines of ``lightning-tricks ARGS``."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    lines = [line for line in capsys.readouterr().err.strip().splitlines() if line.strip()]
    return exit_info.value.code, lines[-TAIL:]


def write_optimizer_configs(root: Path) -> None:
    """Config fragments that switch the digits recipe's SGD to optimizers without momentum."""
    for name, optimizer in {
        "adam_bad_betas": "{name: adam, lr: 0.001, momentum: null, nesterov: false, betas: [0.9, 1.5]}",
        "adadelta": "{name: adadelta, lr: 1.0, momentum: null, nesterov: false}",
    }.items():
        (root / f"{name}.yaml").write_text(f"model:\n  init_args:\n    optimizer: {optimizer}\n")


def write_misspelt_configs(root: Path) -> None:
    """Config files with a misspelt key of the trainer and of the top level, and a mistyped callback value."""
    (root / "misspelt_trainer.yaml").write_text("trainer:\n  max_epoch: 3\n")
    (root / "misspelt_top.yaml").write_text("seed_everythin: 3\n")
    ema = "trainer:\n  callbacks+:\n    - {class_path: EMA, init_args: {decay: high}}\n"
    (root / "ema_typed.yaml").write_text(ema)
    optimizer = "model:\n  init_args:\n    optimizer: {name: sgd, lrr: 0.1}\n"
    (root / "misspelt_optimizer.yaml").write_text(optimizer)


def write_checkpoints(root: Path) -> dict[str, Path]:
    """A truncated and an empty checkpoint file (the complete one is cut in half)."""
    full = root / "full.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}}, full)
    data = full.read_bytes()
    truncated, empty = root / "truncated.ckpt", root / "empty.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    empty.write_bytes(b"")
    return {"truncated": truncated, "empty": empty}


# (id, extra arguments, text the last lines must contain: the key, and optionally more)
CASES: list[tuple[str, list[str], tuple[str, ...]]] = [
    # -- wrong types and unknown names, found while parsing
    ("max_epochs-not-int", ["--trainer.max_epochs=abc"], ("trainer.max_epochs", "int")),
    ("max_epochs-float", ["--trainer.max_epochs=1.5"], ("trainer.max_epochs",)),
    ("unknown-callback", [f"{CB}+=EMAA"], ("trainer.callbacks", "did you mean 'EMA'", "SnapshotEnsemble")),
    ("misspelt-checkpoint", [f"{CB}+=ModelChekpoint"], ("trainer.callbacks", "'ModelCheckpoint'")),
    ("unknown-model-class", ["--model=ImageClasifier"], ("model", "'ImageClassifier'")),
    ("unknown-datamodule", ["--data=DigitDataModule"], ("data", "'DigitsDataModule'")),
    ("unknown-logger", ["--trainer.logger=CSVLoger"], ("trainer.logger", "'CSVLogger'")),
    (
        "unknown-option",
        ["--trainer.max_epohcs=3"],
        ("--trainer.max_epohcs", "did you mean --trainer.max_epochs"),
    ),
    # argparse would take a unique prefix for the whole option (--trainer.max_epochs=3)
    (
        "abbreviated-option",
        ["--trainer.max_epoch=3"],
        ("unknown option(s): --trainer.max_epoch=3", "did you mean --trainer.max_epochs?"),
    ),
    ("abbreviated-own-option", ["--test_after=false"], ("--test_after=false", "--test_after_fit?")),
    ("batch-size-not-int", [f"{DATA}.batch_size=abc"], ("data.init_args.batch_size",)),
    ("lr-not-number", [f"{OPT}.lr=abc"], ("model.init_args.optimizer.lr",)),
    ("kwargs-not-dict", [f"{SCHED}.kwargs=gamma"], ("model.init_args.scheduler.kwargs",)),
    # -- the recipe's optimizer
    ("lr-negative", [f"{OPT}.lr=-1"], ("model.init_args.optimizer.lr", "e.g.")),
    ("lr-zero", [f"{OPT}.lr=0"], ("model.init_args.optimizer.lr",)),
    ("momentum-above-1", [f"{OPT}.momentum=1.5"], ("model.init_args.optimizer.momentum",)),
    ("weight-decay-negative", [f"{OPT}.weight_decay=-0.1"], ("model.init_args.optimizer.weight_decay",)),
    ("optimizer-name", [f"{OPT}.name=adamm"], ("model.init_args.optimizer.name", "'adam'")),
    (
        "betas",
        ["--config={root}/adam_bad_betas.yaml"],
        ("model.init_args.optimizer.betas",),
    ),
    ("momentum-for-adam", [f"{OPT}.name=adam", f"{OPT}.nesterov=false"], ("optimizer.momentum",)),
    ("eps-zero", [f"{OPT}.eps=0"], ("model.init_args.optimizer.eps",)),
    ("nesterov-rmsprop", [f"{OPT}.name=rmsprop"], ("optimizer.nesterov",)),
    ("base-batch-size", [f"{OPT}.base_batch_size=0"], ("model.init_args.optimizer.base_batch_size",)),
    (
        "opt-kwarg-range",
        [f'{OPT}.kwargs={{"dampening": 2}}'],
        ("model.init_args.optimizer.kwargs.dampening",),
    ),
    ("opt-kwarg-unknown", [f'{OPT}.kwargs={{"foo": 1}}'], ("model.init_args.optimizer.kwargs", "dampening")),
    (
        "opt-kwarg-alpha",
        [f"{OPT}.name=rmsprop", f"{OPT}.nesterov=false", f'{OPT}.kwargs={{"alpha": -1}}'],
        ("optimizer.kwargs.alpha",),
    ),
    # -- the recipe's schedule
    ("scheduler-name", [f"{SCHED}.name=cosin"], ("model.init_args.scheduler.name", "'cosine'")),
    ("scheduler-interval", [f"{SCHED}.interval=batch"], ("model.init_args.scheduler.interval",)),
    ("warmup-negative", [f"{SCHED}.warmup=-1"], ("model.init_args.scheduler.warmup",)),
    (
        "warmup-factor-zero",
        [f"{SCHED}.warmup_start_factor=0"],
        ("model.init_args.scheduler.warmup_start_factor",),
    ),
    (
        "exp-gamma-negative",
        [f"{SCHED}.name=exponential", f'{SCHED}.kwargs={{"gamma": -1.0}}'],
        ("scheduler.kwargs.gamma", "> 0"),
    ),
    (
        "step-size-zero",
        [f"{SCHED}.name=step", f'{SCHED}.kwargs={{"step_size": 0}}'],
        ("scheduler.kwargs.step_size",),
    ),
    (
        "step-gamma-zero",
        [f"{SCHED}.name=step", f'{SCHED}.kwargs={{"step_size": 1, "gamma": 0}}'],
        ("scheduler.kwargs.gamma",),
    ),
    (
        "cosine-tmax-zero",
        [f"{SCHED}.name=cosine", f'{SCHED}.kwargs={{"T_max": 0}}'],
        ("scheduler.kwargs.T_max",),
    ),
    (
        "cosine-eta-min",
        [f"{SCHED}.name=cosine", f'{SCHED}.kwargs={{"eta_min": -0.1}}'],
        ("scheduler.kwargs.eta_min",),
    ),
    (
        "one-cycle-pct",
        [f"{SCHED}.name=one_cycle", f'{SCHED}.kwargs={{"pct_start": 1.5}}'],
        ("scheduler.kwargs.pct_start",),
    ),
    ("one-cycle-div", [f'{SCHED}.kwargs={{"div_factor": 0}}'], ("scheduler.kwargs.div_factor",)),
    (
        "milestones-zero",
        [f"{SCHED}.name=multistep", f'{SCHED}.kwargs={{"milestones": [0]}}'],
        ("scheduler.kwargs.milestones",),
    ),
    (
        "milestones-unsorted",
        [f"{SCHED}.name=multistep", f'{SCHED}.kwargs={{"milestones": [5, 2]}}'],
        ("scheduler.kwargs.milestones",),
    ),
    (
        "restarts-t0-zero",
        [f"{SCHED}.name=cosine_restarts", f'{SCHED}.kwargs={{"T_0": 0}}'],
        ("scheduler.kwargs.T_0",),
    ),
    (
        "plateau-factor",
        [f"{SCHED}.name=plateau", f'{SCHED}.kwargs={{"factor": 1.5}}'],
        ("scheduler.kwargs.factor",),
    ),
    (
        "plateau-patience",
        [f"{SCHED}.name=plateau", f'{SCHED}.kwargs={{"patience": -1}}'],
        ("scheduler.kwargs.patience",),
    ),
    (
        "cyclic-mode",
        [f"{SCHED}.name=cyclic", f'{SCHED}.kwargs={{"mode": "triangle"}}'],
        ("scheduler.kwargs.mode",),
    ),
    ("step-missing-size", [f"{SCHED}.name=step"], ("scheduler.kwargs.step_size",)),
    (
        "cosine-unknown-kwarg",
        [f"{SCHED}.name=cosine", f'{SCHED}.kwargs={{"T_maxx": 3}}'],
        ("scheduler.kwargs",),
    ),
    (
        "warmup-longer-than-run",
        [f"{SCHED}.name=cosine", f"{SCHED}.warmup=10"],
        ("model.init_args.scheduler.warmup",),
    ),
    # -- the rest of the recipe
    ("model-name", ["--model.init_args.model=resnet2"], ("model.init_args.model", "'resnet20'")),
    ("tta-mode", ["--model.init_args.tta=flip"], ("model.init_args.tta",)),
    (
        "tta-dense-on-mlp",
        ["--model.init_args.model=mlp", "--model.init_args.tta=[hflip, dense]"],
        ("model.init_args.tta",),
    ),
    (
        "tta-kwargs-option",
        ["--model.init_args.tta=dense", "--model.init_args.tta_kwargs={dense: {crop_size: 3}}"],
        ("model.init_args.tta_kwargs", "dense accepts none"),
    ),
    (
        "progressive-resizing-scale",
        [f"{CB}+=ProgressiveResizing", f"{CB}.initial_scale=2"],
        ("trainer.callbacks[2].init_args.initial_scale", "0.5"),
    ),
    (
        "label-smoothing",
        ["--model.init_args.regularization.label_smoothing=1.5"],
        ("model.init_args.regularization.label_smoothing",),
    ),
    ("init-scheme", ["--model.init_args.init.scheme=kaiming_uniformm"], ("model.init_args.init.scheme",)),
    # -- the DataModule
    ("batch-size-zero", [f"{DATA}.batch_size=0"], ("data.init_args.batch_size", "64")),
    ("val-fraction-above-1", [f"{DATA}.val_fraction=1.5"], ("data.init_args.val_fraction",)),
    ("image-size-small", [f"{DATA}.image_size=4"], ("data.init_args.image_size",)),
    ("augment-preset", [f"{DATA}.augment=[flipp]"], ("data.init_args.augment", "'flip'")),
    ("num-workers", [f"{DATA}.num_workers=-1"], ("data.init_args.num_workers",)),
    (
        "jpeg-quality",
        [
            f"{DATA}.augment=[jpeg]",
            f"{DATA}.augment_on_device=false",
            f"{DATA}.augment_kwargs={{jpeg: {{quality: 101}}}}",
        ],
        ("augment_kwargs.jpeg.quality=101", "1 <= low <= high <= 100"),
    ),
    (
        "salt-pepper-fraction",
        [f"{DATA}.augment=[salt_pepper]", f"{DATA}.augment_kwargs={{salt_pepper: {{fraction: -0.1}}}}"],
        ("augment_kwargs.salt_pepper.fraction=-0.1", "[0, 1]"),
    ),
    (
        "jsd-without-views",
        ["--model.init_args.regularization.jsd_lambda=12"],
        ("regularization.jsd_lambda=12.0", "augmix_jsd"),
    ),
    # -- callbacks: the message says which one, by its index in trainer.callbacks
    ("ema-decay", [f"{CB}+=EMA", f"{CB}.decay=1.5"], ("trainer.callbacks[2].init_args.decay", "0.999")),
    (
        "early-stop-patience",
        [f"{CB}+=SmoothedEarlyStopping", f"{CB}.patience=-1"],
        ("trainer.callbacks[2].init_args.patience",),
    ),
    (
        "momentum-schedule-without-momentum",  # raised when the optimizer is set up, before training
        [f"{CB}+=MomentumSchedule", "--config={root}/adadelta.yaml"],
        ("trainer.callbacks[2]", "MomentumSchedule"),
    ),
    (
        "lr-finder-range",
        [f"{CB}+=LRFinder", f"{CB}.min_lr=1e4", f"{CB}.max_lr=1e2"],
        ("trainer.callbacks[2].init_args.max_lr",),
    ),
    (
        "switch-epoch-zero",
        [f"{CB}+=OptimizerSwitch", f"{CB}.switch_epoch=0"],
        ("trainer.callbacks[2].init_args.switch_epoch",),
    ),
    (
        "momentum-start",
        [f"{CB}+=MomentumSchedule", f"{CB}.start=1.5"],
        ("trainer.callbacks[2].init_args.start",),
    ),
    (
        "overfit-steps",
        [f"{CB}+=OverfitTinyBatch", f"{CB}.max_steps=0"],
        ("trainer.callbacks[2].init_args.max_steps",),
    ),
    (
        "init-loss-tolerance",
        [f"{CB}+=InitLossCheck", f"{CB}.tolerance=0"],
        ("trainer.callbacks[2].init_args.tolerance",),
    ),
    (
        "checkpoint-mode",
        [f"{CB}+=ModelCheckpoint", f"{CB}.mode=maxx"],
        ("trainer.callbacks[2].init_args.mode",),
    ),
    (
        "arg-of-other-callback",
        [f"{CB}.mode=max"],
        ("trainer.callbacks", "LearningRateMonitor has no argument 'mode'"),
    ),
    ("callback-arg-typo", [f"{CB}.logging_intervl=step"], ("trainer.callbacks", "'logging_interval'")),
    # -- the Trainer and the budget
    ("accelerator", ["--trainer.accelerator=cpux"], ("trainer.accelerator",)),
    ("max-epochs-zero", ["--trainer.max_epochs=0"], ("trainer.max_epochs",)),
    ("max-steps-zero", ["--trainer.max_steps=0"], ("trainer.max_steps",)),
    ("accumulate-zero", ["--trainer.accumulate_grad_batches=0"], ("trainer.accumulate_grad_batches",)),
    ("no-train-batches", ["--trainer.limit_train_batches=0"], ("trainer.limit_train_batches",)),
    (
        "val-fraction-zero",
        [f"{DATA}.val_fraction=0"],
        ("trainer.callbacks[0].init_args.monitor", "val_fraction"),
    ),
    (
        "no-val-batches",
        ["--trainer.limit_val_batches=0"],
        ("trainer.callbacks[0].init_args.monitor", "limit_val_batches"),
    ),
    # -- monitors that validation never logs: refused after the sanity check, before training
    (
        "checkpoint-monitor-name",
        [f"{CB}+=ModelCheckpoint", f"{CB}.monitor=val/accuracy"],
        ("trainer.callbacks[2].init_args.monitor", "fix: trainer.callbacks[2].init_args.monitor=val/acc"),
    ),
    (
        "early-stopping-monitor-name",
        [f"{CB}+=SmoothedEarlyStopping", f"{CB}.monitor=val_loss"],
        ("trainer.callbacks[2].init_args.monitor", "monitor=val/loss"),
    ),
    (
        "plateau-monitor-name",
        [f"{SCHED}.name=plateau", f"{SCHED}.interval=epoch", f"{SCHED}.monitor=val/los"],
        ("model.init_args.scheduler.monitor", "=val/loss"),
    ),
    # an example with its own parentheses keeps them in the fix line
    (
        "layer-decay-out-of-range",
        [f"{OPT}.layer_decay=2"],
        (
            "model.init_args.optimizer.layer_decay",
            "fix: e.g. 0.7 (each layer below the head trains at 0.7x the lr of the layer above)\n",
        ),
    ),
    # a message that names the full config key is not prefixed with it a second time
    (
        "pretrained-missing-file",
        ["--model.init_args.pretrained={root}/nowhere.pt"],
        ("error: model.init_args.pretrained (ImageClassifier)", "fix: point model.init_args.pretrained at"),
    ),
    # -- checkpoints to resume from
    ("ckpt-last-never-saved", ["--ckpt_path=last"], ("ckpt_path", "save_last")),
    ("ckpt-missing", ["--ckpt_path={root}/nowhere.ckpt"], ("ckpt_path", "nowhere.ckpt")),
    ("ckpt-truncated", ["--ckpt_path={root}/truncated.ckpt"], ("truncated.ckpt", "corrupt")),
    ("ckpt-empty", ["--ckpt_path={root}/empty.ckpt"], ("empty.ckpt", "empty")),
    ("ckpt-folder", ["--ckpt_path={root}"], ("is a folder (3 checkpoint file(s) inside)", "--ckpt_path=")),
    # -- misspelt keys in config files, and values outside a fixed set
    (
        "config-file-trainer-typo",
        ["--config={root}/misspelt_trainer.yaml"],
        ("unknown config key 'trainer.max_epoch'", "fix: did you mean trainer.max_epochs?"),
    ),
    (
        "config-file-optimizer-typo",  # was reported against `model`
        ["--config={root}/misspelt_optimizer.yaml"],
        ("error: model.init_args.optimizer: OptimizerConfig has no argument 'lrr'", "did you mean 'lr'?"),
    ),
    ("config-file-top-typo", ["--config={root}/misspelt_top.yaml"], ("'seed_everythin'", "seed_everything?")),
    (
        "dict-for-unknown-argument",  # the list of arguments holds those forwarded through **kwargs
        [f"{DATA}.batch_augment_kwargs={{mixup: {{alpha: 0.2}}}}"],
        ("DigitsDataModule has no argument 'batch_augment_kwargs'", "mixup_alpha"),
    ),
    (
        "precision-choice",
        ["--trainer.precision=bf16-mix"],
        ("expected one of", "bf16-mixed, 32-true", "fix: e.g. --trainer.precision=bf16-mixed"),
    ),
    (
        "callback-arg-wrong-type",  # was: "Callback has no argument 'decay'"
        [f"{CB}+=EMA", f"{CB}.decay=high"],
        ("trainer.callbacks (EMA): init_args.decay='high': expected float", "decay: 0.1"),
    ),
    (
        "callback-arg-wrong-type-in-file",  # was: "unknown callback" with the whole list as its name
        ["--config={root}/ema_typed.yaml"],
        ("trainer.callbacks (EMA): init_args.decay='high': expected float",),
    ),
    ("gradient-clip-negative", ["--trainer.gradient_clip_val=-1"], ("trainer.gradient_clip_val=-1", "null")),
]


@pytest.mark.parametrize(("extra", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_configuration_stops_before_training_with_key_and_fix(
    tmp_path, capsys, train_batches, extra, expected
):
    root = tmp_path / "run"
    root.mkdir()
    write_checkpoints(root)
    write_optimizer_configs(root)
    write_misspelt_configs(root)
    args = [arg.replace("{root}", str(root)) for arg in extra]
    status, tail = run_main([*base_args(root), *args], capsys)
    text = "\n".join(tail)
    assert status not in (0, None), text
    assert train_batches == [], "training started"
    assert not [p for p in root.rglob("*") if p.suffix in (".ckpt", ".csv") and p.parent != root]
    assert "Traceback" not in text
    assert "fix:" in text, text
    for needle in expected:
        assert needle in text, f"{needle!r} not in the last lines:\n{text}"


@pytest.mark.parametrize(
    ("args", "fix"),
    [
        (["fitt", f"--config={CONFIG}"], "fix: did you mean 'fit'? the subcommands are fit, validate"),
        (["fit"], "fix: give a config with model and data, e.g. --config configs/digits.yaml"),
        (["fit", f"--config={Path(CONFIG).with_name('digit.yaml')}"], f"fix: did you mean {CONFIG}?"),
    ],
    ids=["subcommand-typo", "no-config", "config-file-typo"],
)
def test_command_line_mistakes_get_a_specific_fix(capsys, args, fix):
    status, tail = run_main(args, capsys)
    assert status == 2 and fix in "\n".join(tail), tail


def test_main_parser_refuses_abbreviated_options(capsys):
    status, tail = run_main(["--vers"], capsys)
    assert status == 2
    assert tail[0] == "error: unknown option(s): --vers"


def test_experiment_commands_refuse_abbreviated_options(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["ablate", "--ablation", str(tmp_path / "ablation.yaml"), "--seed", "1"])  # not --seeds
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --seed 1" in capsys.readouterr().err


def test_sweep_has_at_least_sixty_cases():
    assert len(CASES) >= 60 and len({c[0] for c in CASES}) == len(CASES)


def test_debug_flag_or_variable_shows_the_original_error(tmp_path, monkeypatch, train_batches):
    from lightning_tricks._cli_errors import ConfigError

    args = [*base_args(tmp_path), "--trainer.max_epochs=0"]
    with pytest.raises(ConfigError, match=r"trainer\.max_epochs=0"):
        main([*args, "--debug"])
    monkeypatch.setenv("LIGHTNING_TRICKS_DEBUG", "1")
    with pytest.raises(ConfigError):
        main(args)
    assert train_batches == []


def test_ckpt_path_last_resumes_the_previous_run_in_the_same_folder(tmp_path, train_batches):
    from lightning_tricks.cli import build_cli

    keep_last = [f"{CB}+=ModelCheckpoint", f"{CB}.save_last=true", f"{SCHED}.name=constant"]
    first = build_cli([*base_args(tmp_path), *keep_last])
    assert first.trainer.global_step == 2 and len(train_batches) == 2
    train_batches.clear()
    second = build_cli([*base_args(tmp_path), *keep_last, "--trainer.max_epochs=2", "--ckpt_path=last"])
    # Resumed at step 2: only the second epoch's two batches ran, not a restart from step 0.
    assert len(train_batches) == 2 and second.trainer.global_step == 4
    assert second.trainer.current_epoch == 2
    # `test --ckpt_path last` uses the newest last checkpoint under the same folder.
    last = max(tmp_path.rglob("last*.ckpt"), key=lambda path: path.stat().st_mtime)
    tested = build_cli(["test", *base_args(tmp_path)[1:], "--ckpt_path=last"])
    assert tested.trainer.ckpt_path == str(last.resolve())


def test_resuming_one_cycle_into_more_epochs_is_refused_before_training(tmp_path, capsys, train_batches):
    from lightning_tricks.cli import build_cli

    keep_last = [f"{CB}+=ModelCheckpoint", f"{CB}.save_last=true", "--test_after_fit=false"]
    first = build_cli([*base_args(tmp_path), *keep_last])  # digits.yaml: one_cycle per step
    assert first.trainer.global_step == 2
    train_batches.clear()
    status, tail = run_main(
        [*base_args(tmp_path), *keep_last, "--trainer.max_epochs=2", "--ckpt_path=last"], capsys
    )
    assert status == 1 and train_batches == []
    assert "scheduler.name='one_cycle' is fitted to the checkpoint's run of 2 optimizer steps" in tail[0]
    assert "the resumed run lasts 4 optimizer steps" in tail[0]
    assert tail[1] == "  fix: e.g. trainer.max_epochs=1"


def test_ckpt_path_last_without_checkpoint_is_refused_for_test(tmp_path, capsys):
    status, tail = run_main(["test", *base_args(tmp_path)[1:], "--ckpt_path=last"], capsys)
    assert status == 1
    assert tail[0].startswith("error: ckpt_path='last' finds no last checkpoint") and "untrained" in tail[0]


def test_evaluating_without_ckpt_path_warns_that_the_weights_are_untrained(tmp_path):
    with pytest.warns(UserWarning, match=r"ckpt_path is not set: `validate` runs .* freshly initialised"):
        cli = build_cli(["validate", *base_args(tmp_path)[1:]])
    assert cli.trainer.validate_loop.batch_progress.total.completed == 1  # a warning, the run goes on


def test_truncated_checkpoint_for_test_names_the_file(tmp_path, capsys):
    files = write_checkpoints(tmp_path)
    for kind in ("truncated", "empty"):
        status, tail = run_main(["test", "--config", CONFIG, f"--ckpt_path={files[kind]}"], capsys)
        assert status == 1
        assert tail[0].startswith(f"error: cannot read {files[kind]}: it is ")
        assert "fix:" in tail[1]


def test_readme_error_example_is_what_the_command_prints(tmp_path, capsys, train_batches):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("### When a configuration is wrong", 1)[1].split("```text\n", 1)[1].split("```")[0]
    command, *expected = block.split("$ ")[1].strip().splitlines()
    args = command.split()[1:]
    assert args[:3] == ["fit", "--config", "configs/digits.yaml"]
    args[2] = CONFIG
    status, tail = run_main(args, capsys)
    assert status == 1 and tail[-len(expected) :] == expected
    assert train_batches == []


def test_non_strict_monitor_that_is_never_logged_warns_before_training(tmp_path, train_batches):
    from lightning_tricks.cli import build_cli

    args = [f"{CB}+=EarlyStopping", f"{CB}.monitor=val_loss", f"{CB}.strict=false"]
    with pytest.warns(UserWarning, match=r"trainer\.callbacks\[2\]\.init_args\.monitor='val_loss'.*val/loss"):
        build_cli([*base_args(tmp_path), *args, "--test_after_fit=false"])
    assert len(train_batches) == 2  # a warning, not an error: the run goes on


def test_data_that_cannot_train_names_the_folder(tmp_path, capsys, train_batches, monkeypatch):
    import urllib.error
    import urllib.request

    from data_files import make_tree

    make_tree(tmp_path / "images", per_class=2)
    (tmp_path / "images" / "train" / "no_images").mkdir()
    (tmp_path / "images" / "val" / "no_images").mkdir()
    folder = [
        "--data=ImageFolderDataModule",
        f"{DATA}.data_dir={tmp_path / 'images'}",
        f"{DATA}.crop_size=32",
        f"{DATA}.resize_size=40",
        f"{DATA}.num_workers=0",
        f"{DATA}.stats_cache=null",
    ]
    status, tail = run_main([*base_args(tmp_path), *folder], capsys)
    assert status == 1 and train_batches == []
    assert tail[0].startswith("error: data.init_args.data_dir (ImageFolderDataModule): class folder(s)")
    assert str((tmp_path / "images" / "train" / "no_images").resolve()) in tail[0]

    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cifar = ["--data=CIFAR10DataModule", f"{DATA}.data_dir={tmp_path / 'cifar'}"]
    status, tail = run_main([*base_args(tmp_path), *cifar], capsys)
    assert status == 1 and train_batches == []
    assert tail[0].startswith("error: data.init_args.data_dir (CIFAR10DataModule): CIFAR10: ")
    assert f"{(tmp_path / 'cifar' / 'cifar-10-batches-py').resolve()} does not exist" in tail[0]
    assert "fix: point data.init_args.data_dir at the files described above" in tail[1]


@pytest.mark.parametrize("name", ["label_smoothing", "dropout"])
def test_example_of_an_out_of_range_value_is_given_once(tmp_path, capsys, name):
    key = f"model.init_args.regularization.{name}"
    status, tail = run_main([*base_args(tmp_path), f"--{key}=1.5"], capsys)
    assert status == 1
    assert tail[0] == f"error: {key}: regularization.{name} must be in [0, 1), got 1.5"
    assert tail[1] == "  fix: e.g. 0.1"


def test_missing_val_folder_names_the_folder_and_the_fix(tmp_path, capsys, train_batches):
    from data_files import make_tree

    images = tmp_path / "images"
    make_tree(images, splits=("train",), per_class=2)
    folder = ["--data=ImageFolderDataModule", f"{DATA}.data_dir={images}", f"{DATA}.num_workers=0"]
    status, tail = run_main([*base_args(tmp_path), *folder], capsys)
    assert status == 1 and train_batches == []
    assert tail[0].startswith("error: data.init_args.data_dir (ImageFolderDataModule): missing val/ folder")
    assert f"expected {(images / 'val').resolve()} with one sub-folder per class" in tail[0]
    assert tail[1].startswith(
        "  fix: e.g. move about a tenth of the images of each train/<class>/ into val/<class>/"
    )
    assert "no val_fraction" in tail[1]
    (images / "validation").mkdir()
    status, tail = run_main([*base_args(tmp_path), *folder], capsys)
    assert tail[1].startswith(
        "  fix: e.g. rename the validation folder to val/ (sub-folders here: validation/)"
    )
