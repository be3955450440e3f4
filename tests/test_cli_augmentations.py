"""The new augmentations selected from YAML through the command line, on real digits, a few steps each."""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path

import torch
from torchvision.transforms import v2

from lightning_tricks.cli import build_cli
from lightning_tricks.datamodules.distortions import LensDistortion, SaltAndPepper

CONFIG = str(Path(__file__).parents[1] / "configs" / "digits.yaml")
DATA = "--data.init_args"


def _fit(tmp_path: Path, *args: str):
    return build_cli(
        [
            "fit",
            "--config",
            CONFIG,
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.limit_val_batches=1",
            "--trainer.limit_test_batches=1",
            "--model.init_args.model=small_cnn",
            "--model.init_args.scheduler.name=null",
            f"{DATA}.image_size=8",
            *args,
        ]
    )


def test_per_sample_presets_and_augmix_jsd_from_yaml(tmp_path):
    cli = _fit(
        tmp_path,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.log_every_n_steps=1",
        f"{DATA}.augment=[jpeg, elastic, lens_distortion, salt_pepper, augmix]",
        f"{DATA}.augment_kwargs={{jpeg: {{quality: [30, 90]}}, elastic: {{alpha: 2.0, sigma: 0.5}}, "
        "lens_distortion: {k: [-0.1, 0.3]}, salt_pepper: {fraction: 0.02}, augmix: {severity: 2}}",
        f"{DATA}.augment_on_device=false",
        f"{DATA}.augmix_jsd=true",
        "--model.init_args.regularization.jsd_lambda=12",
    )
    views = cli.datamodule.train_dataloader().dataset.dataset.transform
    shared = [type(t) for t in views.base.transforms]
    assert shared == [v2.ToDtype, v2.JPEG, v2.ElasticTransform, LensDistortion, SaltAndPepper]
    assert tuple(views.base.transforms[1].quality) == (30, 90)
    assert type(views.augmented.transforms[0]) is v2.AugMix and views.augmented.transforms[0].severity == 2
    assert cli.trainer.global_step == 2
    # The fit logged the consistency term every step (the test run after fit clears callback_metrics).
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as rows:
        values = [float(row["train/jsd_step"]) for row in csv.DictReader(rows) if row.get("train/jsd_step")]
    assert len(values) == 2 and all(0 < value < math.log(3) for value in values)


def test_on_device_presets_repeats_and_mixup_off_epoch_from_yaml(tmp_path):
    cli = _fit(
        tmp_path,
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        f"{DATA}.augment=[crop_flip, salt_pepper, lens_distortion]",
        f"{DATA}.augment_kwargs={{salt_pepper: {{fraction: 0.03, salt: 0.2}}, lens_distortion: {{k: 0.1}}}}",
        f"{DATA}.aug_repeats=3",
        f"{DATA}.batch_augment=[mixup]",
        f"{DATA}.mixup_off_epoch=1",
    )
    data = cli.datamodule
    assert data._device_augment.presets == ["crop_flip", "salt_pepper", "lens_distortion"]
    assert data._device_augment.modules["salt_pepper"].salt == 0.2
    assert data._device_augment.modules["lens_distortion"].k == (0.1, 0.1)
    train = len(data._splits["train"])
    assert len(data._train_sampler) == 3 * train
    assert cli.trainer.current_epoch == 2 and cli.trainer.global_step == 4
    assert not data.mixing()  # epoch 1 trained on clean batches
    checkpoint = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    assert checkpoint["DigitsDataModule"]["data_order"]["epoch"] in (1, 2)


def test_readme_augmentation_yaml_builds_the_documented_pipeline(tmp_path):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```yaml\n(.*?)```", readme, flags=re.S) if "augmix_jsd" in b]
    fragment = tmp_path / "augment.yaml"
    fragment.write_text(block)
    jsd = "--model.init_args.regularization.jsd_lambda=12"
    cli = build_cli(["--config", CONFIG, "--config", str(fragment), jsd], run=False)
    cli.datamodule.setup("fit")
    views = cli.datamodule.train_dataloader().dataset.dataset.transform
    assert [type(t).__name__ for t in views.base.transforms] == [
        "RandomCrop",
        "RandomHorizontalFlip",
        "ToDtype",
        "JPEG",
        "LensDistortion",
        "SaltAndPepper",
    ]
    assert cli.model.regularization_config.jsd_lambda == 12
