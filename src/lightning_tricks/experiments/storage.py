"""Optuna study storage: SQLite by default, any RDB URL (PostgreSQL) for workers on many machines.

A stage's trials are created up front as ``WAITING`` trials by whoever creates the stage's study;
every worker (thread, process or machine) then claims one at a time. Optuna's storage changes a
trial's state with a row lock, so a trial is claimed by exactly one worker: N workers run exactly
the N requested trials, none twice, none lost.

Workers that die without a word (``kill -9``, a lost machine) are caught by Optuna's heartbeat:
a running trial records a heartbeat every ``heartbeat_interval`` seconds (:class:`TrialHeartbeat`);
a ``RUNNING`` trial without one for ``grace_period`` seconds is failed by another worker
(``optuna.storages.fail_stale_trials``, before each claim and while waiting) and queued again by
Optuna's ``RetryHeartbeatStaleTrialCallback``. The heartbeat is recorded here, through the
storage's public ``record_heartbeat``, because Optuna records it only inside ``Study.optimize``,
whose ``ask`` creates a fresh trial when the queue is empty (racing workers would overshoot N).

Example::

    storage = open_storage("sqlite:///runs/search/study.db", heartbeat_interval=60)
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from collections.abc import Callable
from typing import Any

import optuna
from filelock import FileLock
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

QUEUED_ATTR = "queued_trials"
DEFAULT_HEARTBEAT_INTERVAL = 60


def mask_password(url: str) -> str:
    """``postgresql://user:secret@host/db`` -> ``postgresql://user:***@host/db``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable storage URL>"


def open_storage(
    url: str,
    timeout_s: float = 10.0,
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL,
    grace_period: int | None = None,
) -> RDBStorage:
    """Connect to ``url`` now, so an unreachable server fails before any trial starts.

    ``heartbeat_interval`` and ``grace_period`` (seconds, default ``2 * heartbeat_interval``) are
    Optuna's: a running trial whose worker sent no heartbeat for ``grace_period`` is failed and
    queued again.

    Raises:
        ValueError: When the storage cannot be reached or created, naming the URL (password masked),
            or when ``heartbeat_interval``/``grace_period`` is not a positive integer.
    """
    for name, value in (("heartbeat_interval", heartbeat_interval), ("grace_period", grace_period)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a whole number of seconds >= 1, got {value!r}.")
    connect_args: dict[str, object] = {}
    if url.startswith("sqlite"):
        connect_args["timeout"] = 60  # workers wait for SQLite's file lock instead of failing
    elif url.startswith("postgresql"):
        connect_args["connect_timeout"] = max(1, int(timeout_s))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RDBStorage(
                url,
                engine_kwargs={"connect_args": connect_args},
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
            )
    except (SQLAlchemyError, ImportError, ValueError) as err:
        reason = str(err).strip().splitlines()[0]
        raise ValueError(
            f"Cannot open the study storage {mask_password(url)}: {reason}. Check that the server runs"
            f" and the URL (driver, host, port, database, user) is right, e.g. sqlite:///study.db or"
            f" postgresql://user:password@host:5432/db."
        ) from None


def stage_exists(storage: RDBStorage, name: str) -> bool:
    try:
        storage.get_study_id_from_name(name)
    except KeyError:
        return False
    return True


def create_stage_study(
    storage: RDBStorage,
    name: str,
    plan: Callable[[], tuple[dict[str, Any], list[dict[str, Any]]]],
    **study_kwargs: Any,
) -> optuna.Study:
    """Create the stage's study and queue its trials, or join it when it exists.

    ``plan()`` returns the stage's search space (stored as the study's ``space`` user attribute)
    and the parameters of every trial to queue. It runs before the study is created, so a worker
    stopped while planning (an LR range test can take a while) leaves no half-made study behind.
    """
    if not stage_exists(storage, name):
        space, trials = plan()
        try:
            study = optuna.create_study(
                storage=storage, study_name=name, load_if_exists=False, **study_kwargs
            )
        except optuna.exceptions.DuplicatedStudyError:
            pass  # another worker was faster: join its study
        else:
            study.set_user_attr("space", space)
            for params in trials:
                study.enqueue_trial(params, skip_if_exists=False)
            study.set_user_attr(QUEUED_ATTR, len(trials))
            return study
    study = optuna.load_study(storage=storage, study_name=name, pruner=study_kwargs.get("pruner"))
    _wait_for_queue(study)
    return study


def _wait_for_queue(study: optuna.Study, timeout_s: float = 300.0) -> None:
    # Another worker created the study an instant ago and may still be queueing its trials.
    deadline = time.monotonic() + timeout_s
    while QUEUED_ATTR not in study.user_attrs:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Study {study.study_name!r} exists but its trials were never queued.")
        time.sleep(0.2)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and queue again) the running trials whose worker sent no heartbeat for the grace period."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def claim_trial(study: optuna.Study) -> optuna.Trial | None:
    """Claim one queued trial for this worker (``None`` when none is queued).

    Stale trials of dead workers are failed and queued again first, so they can be claimed here.
    """
    fail_stale_trials(study)
    storage = study._storage  # the study's own (cached) view of the storage, so its cache stays right
    study_id = storage.get_study_id_from_name(study.study_name)
    with _claim_lock(storage):
        for frozen in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, frozen.number)
            try:
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    return optuna.Trial(study, trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue  # another worker claimed and finished it meanwhile
    return None


def _claim_lock(storage: Any) -> contextlib.AbstractContextManager:
    """A lock file beside a SQLite database, held while a worker claims a trial; a no-op elsewhere.

    The claim (WAITING -> RUNNING) relies on the database locking the trial's row (``SELECT ... FOR
    UPDATE``), which SQLite ignores: two workers could both claim the same queued trial.
    """
    url = getattr(getattr(storage, "_backend", storage), "url", "")
    database = make_url(url).database if str(url).startswith("sqlite") else None
    if not database or database == ":memory:":
        return contextlib.nullcontext()
    return FileLock(f"{database}.claim.lock")


class TrialHeartbeat:
    """Records a running trial's heartbeat every ``heartbeat_interval`` seconds, in a thread.

    Example::

        with TrialHeartbeat(study, trial):
            value = objective(trial)
    """

    def __init__(self, study: optuna.Study, trial: optuna.Trial) -> None:
        self.storage = study._storage
        self.trial_id = trial._trial_id
        self.interval = self.storage.get_heartbeat_interval()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="trial-heartbeat", daemon=True)

    def _beat(self) -> None:
        while True:
            self.storage.record_heartbeat(self.trial_id)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> TrialHeartbeat:
        if self.interval is not None:
            self.storage.record_heartbeat(self.trial_id)  # stale detection starts with the first beat
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def retry_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue ``trial``'s parameters again, marked as a retry of it (as Optuna does for stale trials)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback()(study, trial)


def retried_trial_number(trial: FrozenTrial) -> int | None:
    """The number of the failed trial that ``trial`` retries, ``None`` for a first attempt."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback.retried_trial_number(trial)


def wait_for_more_work(
    study: optuna.Study, poll_s: float = 1.0, stop: Callable[[], bool] = lambda: False
) -> bool:
    """Wait while other workers run the stage's last trials; ``True`` when a trial is queued again.

    Running trials whose worker stopped sending heartbeats are failed and queued again here, so a
    worker that was killed cannot hold the stage forever. ``False`` once nothing is waiting or
    running (the stage is finished) or ``stop()`` says so.
    """
    while not stop():
        fail_stale_trials(study)
        states = {t.state for t in study.get_trials(deepcopy=False)}
        if TrialState.WAITING in states:
            return True
        if TrialState.RUNNING not in states:
            return False
        time.sleep(poll_s)
    return False
