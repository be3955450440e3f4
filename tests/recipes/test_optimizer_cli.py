"""LARS/LAMB, Lookahead and SAM chosen from YAML through the console command."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import torch
import yaml

from lightning_tricks.cli import build_cli
from lightning_tricks.recipes import ImageClassifier
from lightning_tricks.recipes.optim import build_optimizer
from lightning_tricks.recipes.optim_wrappers import innermost
from lightning_tricks.recipes.sam import SAM

CONFIGS = Path(__file__).parents[2] / "configs"
SHORT = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=3",
    "--trainer.limit_val_batches=1",
    "--model.init_args.model=small_cnn",
    "--model.init_args.scheduler.name=cosine",
    "--model.init_args.scheduler.warmup=2",
    "--data.init_args.image_size=8",
]


def test_yaml_builds_lookahead_around_sam_around_lamb_and_checkpoints_it(tmp_path) -> None:
    # digits.yaml's SGD sets momentum and nesterov, which LAMB does not have
    optimizer_yaml = (
        "{name: lamb, lr: 0.01, momentum: null, nesterov: false, weight_decay: 0.01, "
        "lookahead: {k: 2}, sam: {rho: 0.1}}"
    )
    cli = build_cli(
        [
            "fit",
            "--config",
            str(CONFIGS / "digits.yaml"),
            *SHORT,
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.optimizer={optimizer_yaml}",
            "--test_after_fit=false",
        ]
    )
    optimizer = cli.trainer.optimizers[0]
    assert type(optimizer).__name__ == "Lookahead" and isinstance(optimizer._base_optimizer, SAM)
    assert type(innermost(optimizer)).__name__ == "Lamb"
    group = optimizer.param_groups[0]
    assert (group["lookahead_k"], group["lookahead_alpha"], group["sam_rho"], group["sam_adaptive"]) == (
        2,
        0.5,
        0.1,
        False,
    )
    assert (group["eps"], group["weight_decay"], group["always_adapt"]) == (1e-6, 0.01, True)
    assert group["lookahead_step"] == 3
    # the checkpoint holds the wrapped optimizer's state and rebuilds the same configuration
    checkpoint = torch.load(cli.trainer.checkpoint_callback.best_model_path, weights_only=True)
    saved = checkpoint["optimizer_states"][0]
    assert all({"exp_avg", "lookahead_slow_buff"} <= set(s) for s in saved["state"].values())
    hparams = checkpoint["hyper_parameters"]["optimizer"]
    assert hparams["lookahead"] == {"k": 2, "alpha": 0.5} and hparams["sam"] == {
        "rho": 0.1,
        "adaptive": False,
    }
    rebuilt = ImageClassifier.load_from_checkpoint(cli.trainer.checkpoint_callback.best_model_path)
    assert rebuilt.optimizer_config == cli.model.optimizer_config


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("--model.init_args.optimizer.lookahead={k: 0}", ["optimizer.lookahead.k", "integer >= 1", "got 0"]),
        ("--model.init_args.optimizer.sam={rho: 0}", ["optimizer.sam.rho", "> 0", "got 0"]),
        ("--model.init_args.optimizer.name=lion", ["optimizer.name='lion' is unknown", "lars", "lamb"]),
    ],
)
def test_bad_optimizer_yaml_fails_at_startup_naming_the_key(
    tmp_path, override: str, names: list[str]
) -> None:
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises((SystemExit, ValueError)) as info:
        build_cli(["fit", "--config", str(CONFIGS / "digits.yaml"), *SHORT, override])
    message = f"{stderr.getvalue()}\n{info.value}"
    for name in names:
        assert name in message


def test_readme_fragments_build_what_they_say() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme[readme.index("#### Large-batch optimizers") : readme.index("**Model zoo**")]
    fragments = [yaml.safe_load(b) for b in re.findall(r"```yaml\n(.*?)```", section, flags=re.S)]
    built = []
    for fragment in fragments:
        module = ImageClassifier("small_cnn", num_classes=10, in_channels=1, **fragment)
        optimizer = build_optimizer(module.net, module.optimizer_config)
        built.append((type(optimizer).__name__, type(innermost(optimizer)).__name__, module.loss))
    assert built == [
        ("Lars", "Lars", "cross_entropy"),
        ("Lamb", "Lamb", "cross_entropy"),
        ("Lookahead", "SGD", "cross_entropy"),
        ("SGD", "SGD", "multi_margin"),
    ]
    assert ImageClassifier(**fragments[2]).gradient_clipping.clip_factor == 0.01
