"""Search workers that stop mid-trial: killed outright (heartbeat) or interrupted with Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from blocking import BLOCK_ENV
from conftest import LR, RECIPE, WD
from optuna.trial import FrozenTrial, TrialState

from lightning_tricks.experiments.storage import retried_trial_number

SRC = Path(__file__).resolve().parents[2] / "src"
STUDY = "workers"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
WAIT_S = 600  # an upper bound for a loaded machine, never a speed assumption: polls end on the state


def _setup(tmp_path: Path, n_trials: int) -> list[str]:
    recipe = dict(RECIPE)
    recipe["trainer"] = {
        **RECIPE["trainer"],
        "limit_train_batches": 2,
        "callbacks": [{"class_path": "blocking.HoldTrial"}],
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    search = {
        "space": {LR: {"low": 1e-3, "high": 1.0, "log": True}, WD: {"low": 1e-6, "high": 1e-2, "log": True}},
        "coarse": {"n_trials": n_trials, "max_epochs": 1},
        "pruning": False,
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    return [
        sys.executable,
        "-m",
        "lightning_tricks",
        "search",
        f"--config={tmp_path / 'recipe.yaml'}",
        f"--search={tmp_path / 'search.yaml'}",
        f"--study-name={STUDY}",
        f"--out={tmp_path / 'out'}",
        f"--storage=sqlite:///{tmp_path / 'study.db'}",
        "--heartbeat-interval=1",
        "--grace-period=2",
    ]


def _start(command: list[str], tmp_path: Path, name: str, block: bool) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(Path(__file__).parent)])}
    env.pop(BLOCK_ENV, None)
    if block:
        env[BLOCK_ENV] = str(tmp_path / f"{name}.held")
        (tmp_path / f"{name}.held").mkdir()
    log = (tmp_path / f"{name}.log").open("w")
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_until_held(proc: subprocess.Popen, tmp_path: Path, name: str, n_workers: int = 1) -> None:
    """Poll until ``n_workers`` worker processes of ``proc`` are inside a trial."""
    deadline = time.monotonic() + WAIT_S
    while len(list((tmp_path / f"{name}.held").iterdir())) < n_workers:
        assert proc.poll() is None, (tmp_path / f"{name}.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the workers never started their first trials"
        time.sleep(0.2)


def _trials(tmp_path: Path) -> list[FrozenTrial]:
    study = optuna.load_study(study_name=f"{STUDY}.coarse", storage=f"sqlite:///{tmp_path / 'study.db'}")
    return study.get_trials()


def _assert_requested_count(trials: list[FrozenTrial], n: int) -> list[FrozenTrial]:
    """Exactly ``n`` finished trials, one per queued parameter set; the others failed and retried."""
    finished = [t for t in trials if t.state in FINISHED]
    assert len(finished) == n, [(t.number, t.state) for t in trials]
    queued = {tuple(sorted(t.params.items())) for t in trials if t.number < n}
    assert {tuple(sorted(t.params.items())) for t in finished} == queued  # none lost, none twice
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    return [t for t in trials if t.state == TrialState.FAIL]


def test_killed_worker_trial_fails_after_the_grace_period_and_another_worker_finishes(tmp_path):
    command = _setup(tmp_path, n_trials=3)
    victim = _start(command, tmp_path, "victim", block=True)
    _wait_until_held(victim, tmp_path, "victim")
    survivor = _start(command, tmp_path, "survivor", block=False)
    victim.kill()  # SIGKILL: no chance to record anything
    victim.wait()
    assert survivor.wait(timeout=WAIT_S) == 0, (tmp_path / "survivor.log").read_text()[-3000:]

    trials = _trials(tmp_path)
    (killed,) = _assert_requested_count(trials, 3)
    assert killed.user_attrs["pid"] == victim.pid
    (retry,) = [t for t in trials if retried_trial_number(t) == killed.number]
    assert retry.state in FINISHED and retry.params == killed.params
    assert retry.user_attrs["pid"] == survivor.pid


@pytest.mark.parametrize("n_jobs", [1, 2])
def test_ctrl_c_records_the_trial_failed_exits_130_and_the_same_command_resumes(tmp_path, n_jobs):
    command = _setup(tmp_path, n_trials=2)
    worker = _start([*command, f"--n-jobs={n_jobs}"], tmp_path, "first", block=True)
    _wait_until_held(worker, tmp_path, "first", n_workers=n_jobs)
    worker.send_signal(signal.SIGINT)  # to the command's process only: it passes it on to its workers
    assert worker.wait(timeout=WAIT_S) == 130
    last_line = (tmp_path / "first.log").read_text().strip().splitlines()[-1]
    assert last_line.startswith("lightning-tricks search: interrupted: "), last_line
    if n_jobs == 1:
        assert "trial 0 of the coarse stage is recorded FAIL and queued again" in last_line
    assert f"--storage sqlite:///{tmp_path / 'study.db'}" in last_line

    trials = _trials(tmp_path)
    held = trials[:n_jobs]
    assert [t.state for t in trials] == [TrialState.FAIL] * n_jobs + [TrialState.WAITING] * 2
    assert all(t.user_attrs["error"] == "interrupted (Ctrl-C)" for t in held)
    retries = {retried_trial_number(t): t.params for t in trials[2:] if retried_trial_number(t) is not None}
    assert retries == {t.number: t.params for t in held}

    rerun = _start(command, tmp_path, "rerun", block=False)
    assert rerun.wait(timeout=WAIT_S) == 0, (tmp_path / "rerun.log").read_text()[-3000:]
    interrupted = _assert_requested_count(_trials(tmp_path), 2)
    assert [t.number for t in interrupted] == [t.number for t in held]
