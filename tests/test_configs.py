"""Every shipped config runs end to end (a few steps) on data written in the real on-disk formats."""

from __future__ import annotations

from pathlib import Path

import pytest
from data_files import accept_checksums, make_tree, write_cifar10, write_cifar100

from lightning_tricks.cli import build_cli

CONFIGS = Path(__file__).parents[1] / "configs"
QUICK_TRAINER = [
    "--trainer.accelerator=cpu",
    "--trainer.devices=1",
    "--trainer.precision=32-true",
    "--trainer.limit_val_batches=2",
    "--trainer.limit_test_batches=2",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.callbacks+=helpers.MetricRecorder",
]


def seen_metrics(cli) -> set[str]:
    return next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "MetricRecorder").seen


def test_every_config_is_covered_here():
    covered = {"digits", "digits_babysit", "cifar10_resnet56", "cifar100_wrn", "cifar10_resnet18_ema"}
    covered |= {"cifar10_resnet56_snapshot", "imagenet_resnet50", "cifar10_speedrun", "digits_wrn_tricks"}
    assert {path.stem for path in CONFIGS.glob("*.yaml")} == covered


@pytest.mark.parametrize(
    ("config", "steps", "extra", "expected_metrics"),
    [
        ("cifar10_resnet56", 2, [], {"test/acc", "val/acc"}),
        ("cifar10_resnet18_ema", 4, [], {"test/acc", "val/acc", "val/acc_ema"}),
        ("cifar10_resnet56_snapshot", 10, [], {"test/acc", "test/acc_ensemble", "val/acc_ensemble"}),
        ("cifar100_wrn", 2, ["--data.init_args.batch_size=4"], {"test/acc", "val/acc"}),
    ],
)
def test_cifar_configs_train_and_test(tmp_path, monkeypatch, config, steps, extra, expected_metrics):
    if "cifar100" in config:
        write_cifar100(tmp_path, n_train=100, n_test=16)
    else:
        write_cifar10(tmp_path, per_batch=20, n_test=16)
    accept_checksums(monkeypatch, tmp_path)
    cli = build_cli(
        [
            "fit",
            f"--config={CONFIGS / (config + '.yaml')}",
            *QUICK_TRAINER,
            f"--trainer.limit_train_batches={steps}",
            "--trainer.max_epochs=1",
            f"--data.init_args.data_dir={tmp_path}",
            "--data.init_args.download=false",
            "--data.init_args.val_size=20",
            "--data.init_args.batch_size=8",
            "--data.init_args.num_workers=0",
            "--data.init_args.pin_memory=false",
            "--model.init_args.scheduler.warmup=0",
            *extra,
        ]
    )
    assert cli.trainer.global_step == steps
    missing = expected_metrics - seen_metrics(cli)
    assert not missing, f"{config} did not log {missing}"
    assert cli.model.num_classes == (100 if "cifar100" in config else 10)


def test_imagenet_config_trains_and_tests_with_ten_crop(tmp_path):
    make_tree(tmp_path / "imagenet", per_class=3)
    cli = build_cli(
        [
            "fit",
            f"--config={CONFIGS / 'imagenet_resnet50.yaml'}",
            *QUICK_TRAINER,
            "--trainer.limit_train_batches=2",
            "--trainer.max_epochs=1",
            f"--data.init_args.data_dir={tmp_path / 'imagenet'}",
            "--data.init_args.batch_size=2",
            "--data.init_args.num_workers=0",
            "--data.init_args.pin_memory=false",
            "--data.init_args.crop_size=64",
            "--data.init_args.resize_size=72",
            "--data.init_args.augment=[flip, color_jitter, pca_lighting]",
            "--data.init_args.stats_samples=6",
            "--model.init_args.scheduler.warmup=0",
        ]
    )
    assert cli.model.num_classes == 2
    assert {"val/acc", "test/acc", "test/acc_tta"} <= seen_metrics(cli)
    # the linear scaling rule is on: lr 0.1 x global batch 2 / 256
    assert cli.trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(0.1 * 2 / 256)


def test_babysit_config_runs_every_check_and_learns(tmp_path):
    import torch

    cli = build_cli(
        [
            "fit",
            f"--config={CONFIGS / 'digits_babysit.yaml'}",
            "--trainer.max_epochs=1",  # every check runs before or after the first epoch
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.default_root_dir={tmp_path}",
        ]
    )
    names = {type(callback).__name__: callback for callback in cli.trainer.callbacks}
    finder = names["LRFinder"]
    applied = finder.results.suggestions[finder.suggestion]
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(applied)
    labels = torch.cat([batch[1] for batch in cli.datamodule.test_dataloader()])
    chance = labels.bincount().max().item() / len(labels)  # always guessing the commonest digit
    assert chance < 0.2
    assert cli.trainer.callback_metrics["test/acc"].item() > 0.8


def test_speedrun_config_trains_and_its_tta_is_the_mean_over_six_views(tmp_path, monkeypatch):
    import torch

    write_cifar10(tmp_path, per_batch=20, n_test=16)
    accept_checksums(monkeypatch, tmp_path)
    cli = build_cli(
        [
            "fit",
            f"--config={CONFIGS / 'cifar10_speedrun.yaml'}",
            *QUICK_TRAINER,
            "--trainer.limit_train_batches=3",
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
            f"--data.init_args.data_dir={tmp_path}",
            "--data.init_args.download=false",
            "--data.init_args.batch_size=16",
            "--model.init_args.model_kwargs={widths: [8, 16, 16]}",
        ]
    )
    model = cli.model
    assert cli.trainer.global_step == 3
    assert cli.datamodule.flip_mode == "alternating"
    assert "test/acc_tta" in seen_metrics(cli)
    assert bool(model.net.whitening_initialized)
    groups = cli.trainer.optimizers[0].param_groups
    biases = {id(m.bias) for m in model.net.modules() if isinstance(m, torch.nn.BatchNorm2d)}
    (bias_group,) = [g for g in groups if {id(p) for p in g["params"]} == biases]
    assert bias_group["initial_lr"] == pytest.approx(
        64 * max(g["initial_lr"] for g in groups if g is not bias_group)
    )

    images = next(iter(cli.datamodule.test_dataloader()))[0][:4]
    images = cli.datamodule.normalize_images(images)
    model.eval()
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="reflect")
    shifted = [images, padded[..., :32, :32], padded[..., 2:, 2:]]
    with torch.no_grad():
        expected = torch.stack([model(v).softmax(1) for s in shifted for v in (s, s.flip(-1))]).mean(0)
        torch.testing.assert_close(model.predict_step(images, 0), expected)


def test_digits_tricks_config_builds_its_drop_layers_resizes_and_logs_every_view(tmp_path):
    import torch
    from torchvision.ops import DropBlock2d, StochasticDepth

    from lightning_tricks.recipes.models.layers import DropConnectConv2d, DropConnectLinear, drop_path_rates

    cli = build_cli(
        [
            "fit",
            f"--config={CONFIGS / 'digits_wrn_tricks.yaml'}",
            *QUICK_TRAINER,
            "--trainer.limit_train_batches=3",
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--data.init_args.batch_size=16",
            "--model.init_args.model_kwargs.widen_factor=1",
            # small crops keep the 50 views cheap; the YAML's own sizes are for real runs
            "--model.init_args.tta_kwargs.multi_scale_ten_crop={crop_size: 8, scales: [8, 10, 12, 14, 16]}",
        ]
    )
    net = cli.model.net
    depths = [m.p for m in net.modules() if isinstance(m, StochasticDepth)]
    assert depths == pytest.approx(drop_path_rates(0.1, 3))
    assert isinstance(net.drop_block, DropBlock2d) and net.drop_block.p == 0.1
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert all(isinstance(m, (DropConnectConv2d, DropConnectLinear)) and m.p == 0.05 for m in layers)
    (resizing,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "ProgressiveResizing"]
    assert resizing.total_steps == 3 and resizing.size_at(0, 3, (32, 32)) == (16, 16)
    modes = ["hflip", "dense", "multi_scale_ten_crop", "color_pca"]
    expected = {"test/acc", "test/acc_tta", *(f"test/acc_tta_{m}" for m in modes), "train/image_size"}
    assert expected <= seen_metrics(cli)
