"""A search trial on two CPU processes (DDP, gloo): rank 0 reports, every rank follows the pruner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import yaml
from conftest import LR, RECIPE
from helpers import DDP_TIMEOUT
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from lightning_tricks.experiments.storage import QUEUED_ATTR

SRC = Path(__file__).resolve().parents[2] / "src"
SLOW, FAST = 1e-9, 0.5  # learning rates: chance-level val/acc after one epoch, and well above it
PRIOR_ACC = 0.15  # epoch-0 val/acc of the finished trials the median pruner compares with


@pytest.mark.ddp
def test_ddp_trial_reports_once_from_rank_0_and_both_ranks_follow_the_pruner(tmp_path):
    recipe = dict(RECIPE)
    recipe["trainer"] = {**RECIPE["trainer"], "devices": 2, "strategy": "ddp", "limit_train_batches": 2}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    space = {LR: {"choices": [SLOW, FAST]}}
    search = {"space": space, "coarse": {"n_trials": 2, "max_epochs": 2}, "divergence_factor": None}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    storage = f"sqlite:///{tmp_path / 'study.db'}"

    # The coarse stage, made here: three finished trials at PRIOR_ACC after epoch 0 (the median
    # pruner's reference, nothing at epoch 1), then the two queued DDP trials, slow one first.
    study = optuna.create_study(storage=storage, study_name="ddp.coarse", direction="maximize")
    study.set_user_attr("space", space)
    for _ in range(3):
        study.add_trial(
            optuna.trial.create_trial(
                params={LR: FAST},
                distributions={LR: CategoricalDistribution([SLOW, FAST])},
                value=PRIOR_ACC,
                intermediate_values={0: PRIOR_ACC},
            )
        )
    for lr in (SLOW, FAST):
        study.enqueue_trial({LR: lr})
    study.set_user_attr(QUEUED_ATTR, 2)

    command = [
        *(sys.executable, "-m", "lightning_tricks", "search", "--study-name=ddp"),
        *(f"--config={tmp_path / 'recipe.yaml'}", f"--search={tmp_path / 'search.yaml'}"),
        *(f"--storage={storage}", f"--out={tmp_path / 'out'}"),
    ]
    env = {**os.environ, "PYTHONPATH": str(SRC), "WANDB_MODE": "offline"}
    result = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DDP_TIMEOUT
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]

    trials = optuna.load_study(study_name="ddp.coarse", storage=storage).get_trials()
    assert len(trials) == 5  # the peer process never claimed or created a trial
    slow, fast = trials[3], trials[4]
    assert slow.params[LR] == SLOW and fast.params[LR] == FAST
    assert slow.user_attrs["world_size"] == fast.user_attrs["world_size"] == 2
    # the slow trial falls below the median after epoch 0 and is pruned there, on both ranks
    assert slow.state == TrialState.PRUNED and slow.user_attrs["stopped"].startswith("pruned")
    assert list(slow.intermediate_values) == [0] and slow.intermediate_values[0] < PRIOR_ACC
    assert slow.user_attrs["epochs"] == 1
    # the fast one runs both epochs; one report per epoch, the value is the last one
    assert fast.state == TrialState.COMPLETE and fast.user_attrs["epochs"] == 2
    assert list(fast.intermediate_values) == [0, 1] and fast.intermediate_values[0] > PRIOR_ACC
    assert fast.value == fast.intermediate_values[1]
    assert f"[main rank 1] coarse trial {slow.number}: 1 epochs" in result.stdout
    assert f"[main rank 1] coarse trial {fast.number}: 2 epochs" in result.stdout
