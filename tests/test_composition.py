"""Config files compose left to right; a later file adds callbacks with ``callbacks+:`` and keeps the rest."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightning_tricks.cli import build_cli
from lightning_tricks.composition import replaced_callbacks

CONFIGS = Path(__file__).parents[1] / "configs"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]


def callback_names(cli) -> list[str]:
    return [type(callback).__name__ for callback in cli.trainer.callbacks]


def test_shipped_fragments_compose_and_the_ema_fragment_appends():
    files = ["digits.yaml", "logger/wandb.yaml", "trainer/ddp_cpu.yaml", "trainer/ema.yaml"]
    cli = build_cli([*(f"--config={CONFIGS / name}" for name in files), *QUIET], run=False)
    names = callback_names(cli)
    # digits.yaml's callbacks are kept and EMA is appended after them (Lightning moves checkpoints last)
    assert "ModelCheckpoint" in names
    assert names.index("LearningRateMonitor") < names.index("EMA")
    assert cli.trainer.checkpoint_callback.monitor == "val/acc"
    assert type(cli.trainer.logger).__name__ == "WandbLogger"
    assert cli.trainer.num_devices == 2
    assert type(cli.trainer.strategy).__name__ == "DDPStrategy"


def test_command_line_append_after_the_fragments_keeps_both():
    files = ["digits.yaml", "trainer/ema.yaml"]
    cli = build_cli(
        [*(f"--config={CONFIGS / name}" for name in files), "--trainer.callbacks+=LRFinder", *QUIET],
        run=False,
    )
    assert {"ModelCheckpoint", "LearningRateMonitor", "EMA", "LRFinder"} <= set(callback_names(cli))


def test_a_later_file_with_a_plain_callbacks_list_warns_what_it_drops(tmp_path):
    replacing = tmp_path / "replacing.yaml"
    replacing.write_text("trainer:\n  callbacks:\n    - class_path: lightning_tricks.callbacks.EMA\n")
    with pytest.warns(
        UserWarning, match=r"replaces the callbacks .*ModelCheckpoint, LearningRateMonitor.*callbacks\+:"
    ):
        cli = build_cli([f"--config={CONFIGS / 'digits.yaml'}", f"--config={replacing}", *QUIET], run=False)
    # jsonargparse's list rule itself is unchanged: the later list wins, and only Lightning's
    # default checkpoint (monitoring nothing) is left instead of digits.yaml's best-val/acc one
    assert "LearningRateMonitor" not in callback_names(cli)
    assert cli.trainer.checkpoint_callback.monitor is None


def test_replaced_callbacks_names_only_real_losses(tmp_path):
    keeps = tmp_path / "keeps.yaml"
    keeps.write_text("trainer:\n  callbacks:\n    - ModelCheckpoint\n    - LearningRateMonitor\n    - EMA\n")
    shipped = [CONFIGS / "digits.yaml", CONFIGS / "logger" / "wandb.yaml", CONFIGS / "trainer" / "ema.yaml"]
    assert replaced_callbacks(shipped) == []
    assert replaced_callbacks([CONFIGS / "digits.yaml", keeps]) == []
    (found,) = replaced_callbacks([keeps, CONFIGS / "digits.yaml"])
    assert found.dropped == ["EMA"]
