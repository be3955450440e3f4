"""The search on real digits: stages, best config, shared studies, divergence and crashes."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import ClassVar

import optuna
import pytest
import yaml
from conftest import LR, RECIPE, WD
from lightning.pytorch.callbacks import Callback
from optuna.trial import TrialState
from sqlalchemy import create_engine, text

from lightning_tricks.experiments.recipe import run_recipe
from lightning_tricks.experiments.report import write_report
from lightning_tricks.experiments.search import SearchConfig, SearchRun, run_search
from lightning_tricks.experiments.space import SearchSpace

SPACE = {LR: {"low": 1e-3, "high": 1.0, "log": True}, WD: {"low": 1e-6, "high": 1e-2, "log": True}}


def _search(tmp_path: Path, recipe: str, storage: str | None = None, **spec) -> SearchRun:
    config = SearchConfig.from_dict({"space": SPACE, "coarse": {"n_trials": 4, "max_epochs": 1}, **spec})
    config.validate_against([recipe])
    url = storage or f"sqlite:///{tmp_path / 'study.db'}"
    return SearchRun([recipe], config, url, f"test-{uuid.uuid4().hex[:8]}", tmp_path / "out")


def test_two_stages_narrow_around_the_best_and_the_best_config_reproduces(tmp_path, recipe):
    run = _search(tmp_path, recipe, fine={"n_trials": 3, "max_epochs": 1, "top_k": 2, "margin": 0.1})
    wall_s = run_search(run)
    summary = write_report(run, wall_s)

    coarse, fine = summary["stages"]["coarse"], summary["stages"]["fine"]
    assert sum(coarse["states"].values()) == 4 and sum(fine["states"].values()) == 3
    best_coarse = coarse["best_params"]
    coarse_space = SearchSpace.from_dict(coarse["space"])
    fine_space = SearchSpace.from_dict(fine["space"])
    for c, f in zip(coarse_space.params, fine_space.params, strict=True):
        assert c.low <= f.low <= best_coarse[c.key] <= f.high <= c.high
        assert (f.low, f.high) != (c.low, c.high)  # narrowed
    for row in optuna.load_study(study_name=run.stage_name("fine"), storage=run.storage_url).trials:
        assert all(
            fine_space.params[i].low <= row.params[k] <= fine_space.params[i].high
            for i, k in enumerate(SPACE)
        )

    best_file = run.out_dir / "best.yaml"
    best = summary["best"]
    assert (
        yaml.safe_load(best_file.read_text())["model"]["init_args"]["optimizer"]["lr"] == best["params"][LR]
    )
    alone, error = run_recipe([str(best_file)], {}, monitor="val/acc")
    assert error is None
    assert alone.value == pytest.approx(best["value"], abs=1e-6)
    for name in ("trials.csv", "summary.json", "history_coarse.png", "slice_fine.png"):
        assert (run.out_dir / name).stat().st_size > 0


def _assert_exactly(run: SearchRun, n: int) -> None:
    study = optuna.load_study(study_name=run.stage_name("coarse"), storage=run.storage_url)
    trials = study.get_trials(deepcopy=False)
    assert len(trials) == n
    assert sorted(t.number for t in trials) == list(range(n))
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials), [t.state for t in trials]
    assert len({tuple(sorted(t.params.items())) for t in trials}) == n  # no trial ran twice
    assert all("worker" in t.user_attrs for t in trials)


def test_two_workers_share_one_sqlite_study(tmp_path, recipe):
    run = _search(tmp_path, recipe, coarse={"n_trials": 5, "max_epochs": 1})
    run_search(run, n_jobs=2)
    _assert_exactly(run, 5)


def _postgres_url() -> str:
    url = os.environ.get("LIGHTNING_TRICKS_TEST_POSTGRES_URL")
    required = os.environ.get("LIGHTNING_TRICKS_REQUIRE_POSTGRES") == "1"
    reason = None
    if not url:
        reason = "LIGHTNING_TRICKS_TEST_POSTGRES_URL is not set (.ci/run starts a local server and sets it)"
    else:
        try:
            with create_engine(url, connect_args={"connect_timeout": 3}).connect() as conn:
                conn.execute(text("select 1"))
        except Exception as err:
            reason = f"no PostgreSQL server at {url}: {err}"
    if reason and required:
        pytest.fail(reason)
    if reason:
        pytest.skip(reason)
    return url


def test_two_workers_share_one_postgresql_study(tmp_path, recipe):
    run = _search(tmp_path, recipe, storage=_postgres_url(), coarse={"n_trials": 5, "max_epochs": 1})
    run_search(run, n_jobs=2)
    _assert_exactly(run, 5)


def test_diverging_trial_is_stopped_within_a_few_steps_and_never_best(tmp_path):
    recipe = dict(RECIPE, trainer={**RECIPE["trainer"], "limit_train_batches": 30})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = _search(tmp_path, str(path), coarse={"n_trials": 2, "max_epochs": 1}, pruning=False)
    run.search.space = SearchSpace.from_dict({LR: {"choices": [0.05, 1.0e4]}})
    run.search.seed = 1
    run_search(run)
    study = optuna.load_study(study_name=run.stage_name("coarse"), storage=run.storage_url)
    diverged = [t for t in study.trials if t.params[LR] == 1.0e4]
    assert diverged, "the seeded sampler should draw the huge learning rate at least once"
    for t in diverged:
        assert t.state == TrialState.PRUNED
        assert t.user_attrs["stopped"].startswith("diverged")
        assert t.user_attrs["steps"] <= 5
    completed = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert all(t.params[LR] == 0.05 for t in completed)


def test_crashing_trial_is_recorded_failed_and_the_search_goes_on(tmp_path, recipe):
    run = _search(tmp_path, recipe, coarse={"n_trials": 2, "max_epochs": 1})
    # valid for the parser, rejected by the model when it is built: a crash inside the trial
    run.search.space = SearchSpace.from_dict(
        {"model.init_args.model_kwargs": {"choices": [{"no_such_arg": 1}]}}
    )
    run_search(run)
    study = optuna.load_study(study_name=run.stage_name("coarse"), storage=run.storage_url)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert all("no_such_arg" in t.user_attrs["error"] for t in study.trials)


class WandbProbe(Callback):
    """Records the W&B run of each trial (name, group, config) while it trains."""

    seen: ClassVar[list[tuple[str, str, dict]]] = []

    def on_train_start(self, trainer, pl_module):
        run = trainer.logger.experiment
        WandbProbe.seen.append((run.name, run.group, dict(run.config)))


def test_every_trial_is_its_own_offline_wandb_run_in_the_study_group(tmp_path):
    recipe = dict(RECIPE)
    recipe["trainer"] = {
        **RECIPE["trainer"],
        "logger": {
            "class_path": "lightning.pytorch.loggers.WandbLogger",
            "init_args": {"save_dir": str(tmp_path), "offline": True, "project": "search-test"},
        },
        "callbacks": [{"class_path": f"{__name__}.WandbProbe"}],
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run = _search(tmp_path, str(path), coarse={"n_trials": 2, "max_epochs": 1}, pruning=False)
    WandbProbe.seen.clear()
    run_search(run)
    study = optuna.load_study(study_name=run.stage_name("coarse"), storage=run.storage_url)
    assert [(name, group) for name, group, _ in WandbProbe.seen] == [
        ("coarse-0", run.study_name),
        ("coarse-1", run.study_name),
    ]
    for (_, _, config), trial in zip(WandbProbe.seen, study.trials, strict=True):
        assert config[LR] == pytest.approx(trial.params[LR]) and config["trial"] == trial.number


def test_a_sqlite_claim_holds_a_lock_file_that_other_workers_wait_for(tmp_path, monkeypatch):
    """SQLite ignores Optuna's row lock (SELECT ... FOR UPDATE): two workers could both claim one
    queued trial. The claim must hold a lock file another process cannot take meanwhile."""
    from filelock import FileLock, Timeout

    from lightning_tricks.experiments.storage import claim_trial, open_storage

    database = tmp_path / "study.db"
    study = optuna.create_study(storage=open_storage(f"sqlite:///{database}", heartbeat_interval=60))
    study.enqueue_trial({"x": 1.0})
    backend = study._storage._backend
    held_during_claim = []
    set_state = backend.set_trial_state_values

    def checking_set_state(trial_id, state, values=None):
        try:
            FileLock(f"{database}.claim.lock", timeout=0).acquire()
        except Timeout:
            held_during_claim.append(True)
        else:
            held_during_claim.append(False)
        return set_state(trial_id, state, values)

    monkeypatch.setattr(backend, "set_trial_state_values", checking_set_state)
    trial = claim_trial(study)
    assert trial is not None and trial.number == 0
    assert held_during_claim == [True]
    assert claim_trial(study) is None  # the one queued trial is claimed once
