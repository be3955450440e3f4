"""The README's examples stay true: its YAML recipe parses and builds, its snippet's names exist."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

import lightning_tricks.callbacks as callbacks
from lightning_tricks.cli import build_cli

README = (Path(__file__).parents[1] / "README.md").read_text()


def section_blocks(heading: str, language: str) -> list[str]:
    """The ``language`` code blocks of the README section titled ``heading`` (up to the next ``## ``)."""
    start = README.index(f"\n## {heading}\n")
    end = README.find("\n## ", start + 1)
    section = README[start : end if end != -1 else None]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_readme_yaml_recipe_builds_every_class(tmp_path):
    configs = [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)```", README, flags=re.S)]
    (config,) = [config for config in configs if "model" in config]  # the others are fragments
    config["data"]["init_args"]["data_dir"] = str(tmp_path)
    path = tmp_path / "readme.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = build_cli(["--config", str(path), "--trainer.enable_progress_bar=false"], run=False)
    assert type(cli.datamodule).__name__ == "CIFAR10DataModule"
    assert cli.datamodule.batch_augment == ["mixup", "cutmix"]
    assert cli.model.hparams.model_kwargs == {"depth": 16, "widen_factor": 4}
    assert any(type(cb).__name__ == "EMA" for cb in cli.trainer.callbacks)


def test_readme_short_names_and_snippet_imports_resolve():
    cli = build_cli(
        ["--model=ImageClassifier", "--data=DigitsDataModule", "--trainer.callbacks+=EMA"], run=False
    )
    assert any(type(cb).__name__ == "EMA" for cb in cli.trainer.callbacks)
    snippets = re.findall(r"from lightning_tricks.callbacks import \((.*?)\)", README, flags=re.S)
    names = [name.strip() for snippet in snippets for name in snippet.replace("\n", " ").split(",")]
    names = [name for name in names if name]
    assert names and all(hasattr(callbacks, name) for name in names)


def test_readme_own_project_example_runs_on_a_module_that_is_not_ours(tmp_path, monkeypatch):
    (block,) = section_blocks("Using the callbacks in your own project", "python")
    monkeypatch.chdir(tmp_path)  # the Trainer's default_root_dir
    namespace: dict = {"__name__": "readme_example"}
    exec(compile(block, "README.md", "exec"), namespace)
    trainer, ema = namespace["trainer"], namespace["ema"]
    finder = next(cb for cb in trainer.callbacks if isinstance(cb, callbacks.LRFinder))
    assert finder.results.lr is not None
    assert trainer.lightning_module.hparams.lr == finder.results.lr
    assert ema.num_updates == trainer.global_step == 6 * trainer.current_epoch  # 192 samples / 32 a batch
    assert {"val_acc", "val_acc_ema", "val_loss_ema"} <= set(trainer.callback_metrics)
    check = next(cb for cb in trainer.callbacks if isinstance(cb, callbacks.InitLossCheck))
    assert check.passed
