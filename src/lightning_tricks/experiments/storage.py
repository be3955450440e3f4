"""Optuna study storage: SQLite by default, any RDB URL (PostgreSQL) for workers on many machines.

A stage's trials are created up front as ``WAITING`` trials by whoever creates the stage's study;
every worker (thread, process or machine) then claims one at a time. Optuna's storage changes a
trial's state with a row lock, so a trial is claimed by exactly one worker: N workers run exactly
the N requested trials, none twice, none lost.

Example::

    storage = open_storage("sqlite:///runs/search/study.db")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

QUEUED_ATTR = "queued_trials"


def mask_password(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable storage URL>"


def open_storage(url: str, timeout_s: float = 10.0) -> RDBStorage:
    """Connect to ``url`` now, so an unreachable server fails before any trial starts.

    Raises:
        ValueError: When the storage cannot be reached or created, naming the URL (password masked).
    """
    connect_args: dict[str, object] = {}
    if url.startswith("sqlite"):
        connect_args["timeout"] = 60  # workers wait for SQLite's file lock instead of failing
    elif url.startswith("postgresql"):
        connect_args["connect_timeout"] = max(1, int(timeout_s))
    try:
        return RDBStorage(url, engine_kwargs={"connect_args": connect_args}, heartbeat_interval=None)
    except (SQLAlchemyError, ImportError, ValueError) as err:
        reason = str(err).strip().splitlines()[0]
        raise ValueError(
            f"Cannot open the study storage {mask_password(url)}: {reason}. Check that the server runs"
            f" and the URL (driver, host, port, database, user) is right, e.g. sqlite:///study.db or"
            f" postgresql://user:password@host:5432/db."
        ) from None


def create_stage_study(
    storage: RDBStorage,
    name: str,
    plan: Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]],
    **study_kwargs: Any,
) -> optuna.Study:
    """Create the stage's study and queue its trials, or join it when it exists.

    Only the worker that creates the study calls ``plan()``, which returns the stage's search space
    (stored as the study's ``space`` user attribute) and the parameters of every trial to queue.
    """
    try:
        study = optuna.create_study(storage=storage, study_name=name, load_if_exists=False, **study_kwargs)
    except optuna.exceptions.DuplicatedStudyError:
        pruner = study_kwargs.get("pruner")
        study = optuna.load_study(storage=storage, study_name=name, pruner=pruner)
        _wait_for_queue(study)
        return study
    space, trials = plan()
    study.set_user_attr("space", space)
    for params in trials:
        study.enqueue_trial(params, skip_if_exists=False)
    study.set_user_attr(QUEUED_ATTR, len(trials))
    return study


def _wait_for_queue(study: optuna.Study, timeout_s: float = 300.0) -> None:
    # Another worker created the study an instant ago and may still be queueing its trials.
    deadline = time.monotonic() + timeout_s
    while QUEUED_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Study {study.study_name!r} exists but its trials were never queued.")
        time.sleep(0.2)


def claim_trial(study: optuna.Study) -> optuna.Trial | None:
    """Claim one queued trial for this worker (``None`` when all are taken)."""
    storage = study._storage  # the study's own (cached) view of the storage, so its cache stays right
    study_id = storage.get_study_id_from_name(study.study_name)
    for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
        if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
            return optuna.Trial(study, trial_id)
    return None


def wait_until_finished(study: optuna.Study, poll_s: float = 1.0) -> None:
    """Block until no trial of ``study`` is waiting or running (other workers finish theirs)."""
    while study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)):
        time.sleep(poll_s)
