"""Coarse-to-fine random search over an unchanged LightningCLI recipe, on an Optuna study.

The search file (YAML)::

    metric: val/acc                 # logged metric, read at every validation
    direction: maximize
    seed: 0                         # seed of the trials' sampled values
    divergence_factor: 3.0          # stop a trial whose smoothed train/loss > 3x its first value (or NaN)
    pruning: true                   # Optuna MedianPruner on the per-epoch metric
    lr_finder: null                 # or the LR's dotted key: the coarse LR range comes from an LR range test
    coarse: {n_trials: 8, max_epochs: 2}
    fine: {n_trials: 8, max_epochs: 4, top_k: 3, margin: 0.1}   # optional
    space:
      model.init_args.optimizer.lr: {low: 1.0e-3, high: 1.0, log: true}
      model.init_args.optimizer.weight_decay: {low: 1.0e-6, high: 1.0e-2, log: true}

Random search, as the lectures recommend (not grid): each stage's N parameter sets are drawn up front
with Optuna's seeded ``RandomSampler`` by the worker that creates the stage's study and queued in it;
every worker then claims queued trials one by one (see :mod:`.storage`), so any number of workers on
any number of machines runs exactly N trials. The fine stage starts when the coarse one has
finished; its space comes from :meth:`SearchSpace.narrow` around the ``top_k`` best coarse trials.

A trial is recorded as ``COMPLETE`` with the metric's last value, ``PRUNED`` when the pruner or the
divergence rule stopped it (user attribute ``stopped``), or ``FAIL`` with its error (attribute
``error``) when it crashed; the search goes on. Ctrl-C marks the running trial ``FAIL``
(``interrupted``) and queues it again, so the same command resumes the study; a worker killed
outright stops sending heartbeats, and another worker fails its trial after the grace period and
queues it again (:mod:`.storage`). A recipe with ``trainer.devices: 2`` and ``strategy: ddp`` runs
each trial on two processes; only rank 0 talks to Optuna (see :meth:`SearchRun.run_ddp_peer`).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from optuna.storages import RDBStorage
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from lightning_tricks.callbacks.early_stopping import SmoothedEarlyStopping
from lightning_tricks.experiments.interrupt import GracefulInterrupt, SearchInterrupted
from lightning_tricks.experiments.recipe import check_override, parse_recipe, run_recipe
from lightning_tricks.experiments.space import SearchSpace
from lightning_tricks.experiments.storage import (
    DEFAULT_HEARTBEAT_INTERVAL,
    TrialHeartbeat,
    claim_trial,
    create_stage_study,
    mask_password,
    open_storage,
    retry_trial,
    wait_for_more_work,
)

STAGES = ("coarse", "fine")
_DIVERGED = (EarlyStoppingReason.DIVERGENCE_THRESHOLD, EarlyStoppingReason.NON_FINITE_METRIC)


@dataclass
class StageConfig:
    """One stage: how many trials, how many epochs each, and (fine) how to narrow."""

    n_trials: int
    max_epochs: int
    top_k: int = 3
    margin: float = 0.1

    def __post_init__(self) -> None:
        if not isinstance(self.n_trials, int) or self.n_trials < 1:
            raise ValueError(f"n_trials must be an integer >= 1, got {self.n_trials!r}")
        if not isinstance(self.max_epochs, int) or self.max_epochs < 1:
            raise ValueError(f"max_epochs must be an integer >= 1, got {self.max_epochs!r}")
        if not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an integer >= 1, got {self.top_k!r}")
        if not 0.0 <= self.margin <= 1.0:
            raise ValueError(f"margin must be in [0, 1], got {self.margin}")


@dataclass
class SearchConfig:
    """The parsed search file (see the module docstring)."""

    space: SearchSpace
    coarse: StageConfig
    fine: StageConfig | None = None
    metric: str = "val/acc"
    direction: str = "maximize"
    seed: int = 0
    divergence_factor: float | None = 3.0
    pruning: bool = True
    lr_finder: str | None = None

    @classmethod
    def from_yaml(cls, path: str | Path) -> SearchConfig:
        data = yaml.safe_load(Path(path).read_text())
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "search file") -> SearchConfig:
        known = {
            "space",
            "coarse",
            "fine",
            "metric",
            "direction",
            "seed",
            "divergence_factor",
            "pruning",
            "lr_finder",
        }
        if not isinstance(data, Mapping) or "space" not in data or "coarse" not in data:
            raise ValueError(f"{source} needs at least `space:` and `coarse: {{n_trials, max_epochs}}`.")
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{source}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}.")
        if data.get("direction", "maximize") not in ("maximize", "minimize"):
            raise ValueError(
                f"{source}: direction must be 'maximize' or 'minimize', got {data['direction']!r}."
            )
        stages = {}
        for name in STAGES:
            spec = data.get(name)
            if spec is None:
                continue
            try:
                stages[name] = StageConfig(**spec)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{source}: stage `{name}`: {err}") from None
        rest = {k: data[k] for k in known - {"space", *STAGES} if k in data}
        return cls(space=SearchSpace.from_dict(data["space"]), **stages, **rest)

    def validate_against(self, configs: Sequence[str]) -> None:
        """Fail before any trial when a key or a value type does not fit the recipe."""
        for param in self.space.params:
            check_override(configs, param.key, param.probe_values())
        if self.lr_finder is not None and self.lr_finder not in self.space.keys:
            raise ValueError(f"lr_finder names {self.lr_finder!r}, which is not a key of the search space.")


def sample_trials(space: SearchSpace, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` parameter sets drawn by Optuna's seeded ``RandomSampler`` (log-uniform on log ranges)."""
    sampler = optuna.samplers.RandomSampler(seed=seed)
    scratch = optuna.create_study(sampler=sampler)
    out = []
    for _ in range(n):
        trial = scratch.ask(space.distributions())
        out.append(dict(trial.params))
        scratch.tell(trial, 0.0)
    return out


def best_trials(study: optuna.Study, k: int | None = None) -> list[optuna.trial.FrozenTrial]:
    """Completed trials, best first."""
    done = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if math.isfinite(t.value)
    ]
    reverse = study.direction == optuna.study.StudyDirection.MAXIMIZE
    done.sort(key=lambda t: t.value, reverse=reverse)
    return done if k is None else done[:k]


@dataclass
class SearchRun:
    """What one worker needs: the recipe, the search file, where the study lives."""

    configs: list[str]
    search: SearchConfig
    storage_url: str
    study_name: str
    out_dir: Path
    worker: str = "main"
    heartbeat_interval: int = DEFAULT_HEARTBEAT_INTERVAL
    grace_period: int | None = None
    trial_stats: list[dict[str, float]] = field(default_factory=list)
    _uses_wandb: bool | None = None
    _interrupted: tuple[str, int] | None = None

    def uses_wandb(self) -> bool:
        """Whether the recipe logs to W&B through one ``WandbLogger``."""
        if self._uses_wandb is None:
            logger = (parse_recipe(self.configs).get("trainer") or {}).get("logger")
            self._uses_wandb = isinstance(logger, Mapping) and "WandbLogger" in str(logger.get("class_path"))
        return self._uses_wandb

    def study_kwargs(self) -> dict[str, Any]:
        pruner = (
            optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
            if self.search.pruning
            else optuna.pruners.NopPruner()
        )
        return {"direction": self.search.direction, "pruner": pruner}

    def stage_name(self, stage: str) -> str:
        return f"{self.study_name}.{stage}"

    # -- planning (only the worker that creates a stage's study) -----------------------------------
    def plan_stage(self, stage: str, storage: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        cfg = getattr(self.search, stage)
        if stage == "coarse":
            space = self.search.space
            if self.search.lr_finder is not None:
                space = self._space_with_lr_finder_range(space)
        else:
            coarse = optuna.load_study(storage=storage, study_name=self.stage_name("coarse"))
            top = best_trials(coarse, cfg.top_k)
            space = SearchSpace.from_dict(coarse.user_attrs["space"]).narrow(
                [t.params for t in top], cfg.margin
            )
        seed = self.search.seed + (0 if stage == "coarse" else 1)
        return space.as_dict(), sample_trials(space, cfg.n_trials, seed)

    def _space_with_lr_finder_range(self, space: SearchSpace) -> SearchSpace:
        from lightning_tricks.callbacks.lr_finder import LRFinder
        from lightning_tricks.experiments.lr_range import lr_search_range

        finder = LRFinder(apply=False)
        _, error = run_recipe(
            self.configs, {"trainer.max_epochs": 1, "trainer.limit_train_batches": 1}, callbacks=[finder]
        )
        if error is not None or finder.results is None:
            raise RuntimeError(f"The LR range test for `{self.search.lr_finder}` failed: {error!r}")
        low, high = lr_search_range(finder.results)
        print(f"LR range test: searching {self.search.lr_finder} in [{low:.3g}, {high:.3g}] (log)")
        spec = space.as_dict()
        spec[self.search.lr_finder] = {"low": low, "high": high, "log": True}
        return SearchSpace.from_dict(spec)

    # -- running -------------------------------------------------------------------------------
    def open_storage(self) -> RDBStorage:
        return open_storage(
            self.storage_url, heartbeat_interval=self.heartbeat_interval, grace_period=self.grace_period
        )

    def run_worker(self) -> None:
        """Join (or create) every stage's study and run queued trials until none is left.

        Raises:
            SearchInterrupted: On Ctrl-C, once the running trial is recorded ``FAIL`` and queued again.
        """
        with GracefulInterrupt() as interrupts:
            try:
                self._run_stages(interrupts)
            except (KeyboardInterrupt, SystemExit):  # Lightning turns Ctrl-C during fit into exit(1)
                if not interrupts.requested:
                    raise
            if interrupts.requested:
                raise SearchInterrupted(self._interrupted_message())

    def _interrupted_message(self) -> str:
        done = ""
        if self._interrupted is not None:
            stage, number = self._interrupted
            done = f"trial {number} of the {stage} stage is recorded FAIL and queued again; "
        return (
            f"interrupted: {done}the study is consistent. Run the same command"
            f" (--storage {mask_password(self.storage_url)}) to continue it."
        )

    def _run_stages(self, interrupts: GracefulInterrupt) -> None:
        storage = self.open_storage()
        for stage in STAGES:
            cfg = getattr(self.search, stage)
            if cfg is None:
                continue

            def plan(s: str = stage) -> tuple[dict[str, Any], list[dict[str, Any]]]:
                with interrupts.interruptible():
                    return self.plan_stage(s, storage)

            study = create_stage_study(storage, self.stage_name(stage), plan, **self.study_kwargs())
            space = SearchSpace.from_dict(study.user_attrs["space"])
            self._run_stage(study, space, stage, interrupts)
            if interrupts.requested:
                return

    def _run_stage(
        self,
        study: optuna.Study,
        space: SearchSpace,
        stage: str,
        interrupts: GracefulInterrupt,
    ) -> None:
        while True:
            while (trial := claim_trial(study)) is not None:
                self._run_claimed(study, trial, space, stage, interrupts)
                if interrupts.requested:
                    return
            if not wait_for_more_work(study, stop=lambda: interrupts.requested):
                return

    def _run_claimed(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        space: SearchSpace,
        stage: str,
        interrupts: GracefulInterrupt,
    ) -> None:
        """Run a claimed trial under its heartbeat and tell the study how it ended."""
        with TrialHeartbeat(study, trial):
            try:
                value = self.run_trial(study, trial, space, stage, interrupts)
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED)
                return
            except TrialCrashed:
                study.tell(trial, state=TrialState.FAIL)
                return
            except KeyboardInterrupt:
                study.tell(trial, state=TrialState.FAIL)
                (failed,) = [t for t in study.get_trials(deepcopy=False) if t.number == trial.number]
                retry_trial(study, failed)
                self._interrupted = (stage, trial.number)
                raise
        study.tell(trial, value)

    def trial_callbacks(
        self, trial: optuna.Trial
    ) -> tuple[list[Callback], SmoothedEarlyStopping | None, PyTorchLightningPruningCallback | None]:
        """The divergence (3x rule) and pruning callbacks of one trial, on every DDP rank alike."""
        direction = "max" if self.search.direction == "maximize" else "min"
        callbacks: list[Callback] = []
        divergence: SmoothedEarlyStopping | None = None
        pruning: PyTorchLightningPruningCallback | None = None
        if self.search.divergence_factor is not None:
            divergence = SmoothedEarlyStopping(
                monitor=self.search.metric,
                mode=direction,
                patience=10**9,  # only the explosion and non-finite rules may stop a trial
                strict=False,
                divergence_factor=self.search.divergence_factor,
                train_check_every_n_steps=1,
            )
            callbacks.append(divergence)
        if self.search.pruning:
            pruning = PyTorchLightningPruningCallback(trial, monitor=self.search.metric)
            callbacks.append(pruning)
        return callbacks, divergence, pruning

    def trial_overrides(self, trial_number: int, params: Mapping[str, Any], stage: str) -> dict[str, Any]:
        cfg = getattr(self.search, stage)
        overrides = {**params, "trainer.max_epochs": cfg.max_epochs}
        if self.uses_wandb():  # one W&B run per trial, all in the study's group
            overrides["trainer.logger.init_args.name"] = f"{stage}-{trial_number}"
            overrides["trainer.logger.init_args.group"] = self.study_name
        return overrides

    def run_trial(
        self,
        study: optuna.Study,
        trial: optuna.Trial,
        space: SearchSpace,
        stage: str,
        interrupts: GracefulInterrupt,
    ) -> float:
        """Run the recipe with the trial's values; returns its metric, or raises.

        Raises:
            optuna.TrialPruned: Pruned, or stopped by the divergence rule (user attribute ``stopped``).
            TrialCrashed: The recipe failed (user attribute ``error``); the search goes on.
            KeyboardInterrupt: Ctrl-C (user attribute ``error``).
        """
        trial.set_user_attr("worker", self.worker)
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = space.suggest(trial)
        overrides = self.trial_overrides(trial.number, params, stage)
        callbacks, divergence, pruning = self.trial_callbacks(trial)
        peer = {"study": study.study_name, "trial_id": trial._trial_id, "stage": stage}
        peer["overrides"] = overrides
        try:
            with interrupts.interruptible(), ddp_peer_environment(peer):
                run, error = run_recipe(
                    self.configs,
                    overrides,
                    monitor=self.search.metric,
                    callbacks=callbacks,
                    hyperparameters={"trial": trial.number, "stage": stage, **params},
                )
        except (KeyboardInterrupt, SystemExit):
            if not interrupts.requested:
                raise
            trial.set_user_attr("error", "interrupted (Ctrl-C)")
            raise KeyboardInterrupt from None
        if error is None and pruning is not None and pruning.is_ddp_backend:
            try:  # DDP: rank 0 recorded the pruning decision that every rank followed
                pruning.check_pruned()
            except optuna.TrialPruned as pruned:
                error = pruned
        for name, value in (("epochs", run.epochs), ("steps", run.steps), ("fixed_cost_s", run.fixed_cost_s)):
            trial.set_user_attr(name, value)
        trial.set_user_attr("wall_s", run.wall_s)
        trial.set_user_attr("world_size", run.world_size)
        self.trial_stats.append({"fixed_cost_s": run.fixed_cost_s, "wall_s": run.wall_s})
        print(
            f"[{self.worker}] {stage} trial {trial.number}: fixed cost {run.fixed_cost_s:.2f} s"
            f" (start -> first batch), total {run.wall_s:.2f} s, {run.epochs} epochs, {run.steps} steps"
        )
        if divergence is not None and divergence.stopping_reason in _DIVERGED:
            trial.set_user_attr("stopped", f"diverged: {divergence.stopping_reason_message}")
            raise optuna.TrialPruned(divergence.stopping_reason_message)
        if isinstance(error, optuna.TrialPruned):
            trial.set_user_attr("stopped", f"pruned: {error}")
            raise error
        if error is not None:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
            raise TrialCrashed(f"{type(error).__name__}: {error}") from error
        if not math.isfinite(run.value):
            message = f"`{self.search.metric}` was not logged or not finite: {run.value}"
            trial.set_user_attr("error", message)
            raise TrialCrashed(message)
        return run.value

    def run_ddp_peer(self, peer: Mapping[str, Any]) -> None:
        """Run one trial as a DDP rank > 0: the same recipe and callbacks as rank 0, nothing reported.

        Lightning starts these processes with the command line of rank 0 (the ``search`` command);
        rank 0 passes the trial in the environment (:func:`ddp_peer_environment`).
        """
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 handles Ctrl-C and stops its peers
        study = optuna.load_study(study_name=peer["study"], storage=self.open_storage())
        trial = optuna.Trial(study, peer["trial_id"])
        callbacks, _, _ = self.trial_callbacks(trial)
        run, error = run_recipe(
            self.configs, peer["overrides"], monitor=self.search.metric, callbacks=callbacks
        )
        rank = os.environ.get("LOCAL_RANK")
        print(
            f"[{self.worker} rank {rank}] {peer['stage']} trial {trial.number}: {run.epochs} epochs,"
            f" {run.steps} steps" + (f", ended with {type(error).__name__}: {error}" if error else "")
        )


class TrialCrashed(Exception):
    """A trial's recipe failed; Optuna records the trial ``FAIL`` and the search goes on."""


PEER_ENV = "LIGHTNING_TRICKS_SEARCH_TRIAL"
# Set by Lightning's DDP launcher in the launching process; a later trial must launch its own peers.
_LAUNCH_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", PEER_ENV)


@contextlib.contextmanager
def ddp_peer_environment(peer: Mapping[str, Any]) -> Iterator[None]:
    """Publish the running trial to DDP peer processes; restore the launch variables afterwards."""
    saved = {name: os.environ.get(name) for name in _LAUNCH_ENV}
    os.environ[PEER_ENV] = json.dumps(dict(peer))
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def ddp_peer_trial() -> dict[str, Any] | None:
    """The trial this process runs as a DDP rank > 0, or ``None`` in a search worker."""
    if PEER_ENV not in os.environ or os.environ.get("LOCAL_RANK", "0") == "0":
        return None
    return json.loads(os.environ[PEER_ENV])


def _worker_entry(run: SearchRun) -> None:
    try:
        run.run_worker()
    except SearchInterrupted:
        sys.exit(130)


def run_search(run: SearchRun, n_jobs: int = 1) -> float:
    """Run the search with ``n_jobs`` worker processes here; returns the wall time in seconds.

    Raises:
        SearchInterrupted: On Ctrl-C, after every worker left the study consistent.
    """
    run.open_storage()  # fail now, with the URL, when the storage is unreachable
    started = time.perf_counter()
    if n_jobs <= 1:
        run.run_worker()
        return time.perf_counter() - started
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_worker_entry, args=(replace(run, worker=f"worker-{i}"),), daemon=False)
        for i in range(n_jobs)
    ]

    def pass_on() -> None:  # a Ctrl-C in a terminal reaches them anyway; `kill -INT <pid>` does not
        for proc in procs:
            if proc.pid is not None and proc.exitcode is None:
                os.kill(proc.pid, signal.SIGINT)

    with GracefulInterrupt(on_request=pass_on) as interrupts:
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
    if interrupts.requested or any(p.exitcode == 130 for p in procs):
        raise SearchInterrupted(run._interrupted_message())
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise RuntimeError(f"{len(bad)} of {n_jobs} search workers exited with codes {bad}")
    return time.perf_counter() - started
