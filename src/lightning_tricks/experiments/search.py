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
(``interrupted``) and queues it again, so the same command resumes the study.
"""

from __future__ import annotations

import math
import multiprocessing
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import yaml
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback

from lightning_tricks.callbacks.early_stopping import SmoothedEarlyStopping
from lightning_tricks.experiments.recipe import check_override, parse_recipe, run_recipe
from lightning_tricks.experiments.space import SearchSpace
from lightning_tricks.experiments.storage import (
    claim_trial,
    create_stage_study,
    open_storage,
    wait_until_finished,
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
    trial_stats: list[dict[str, float]] = field(default_factory=list)
    _uses_wandb: bool | None = None

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
    def run_worker(self) -> None:
        """Join (or create) every stage's study and run queued trials until none is left."""
        storage = open_storage(self.storage_url)
        for stage in STAGES:
            cfg = getattr(self.search, stage)
            if cfg is None:
                continue
            study = create_stage_study(
                storage,
                self.stage_name(stage),
                lambda s=stage: self.plan_stage(s, storage),
                **self.study_kwargs(),
            )
            space = SearchSpace.from_dict(study.user_attrs["space"])
            while (trial := claim_trial(study)) is not None:
                self.run_trial(study, trial, space, stage, cfg)
            wait_until_finished(study)

    def run_trial(
        self, study: optuna.Study, trial: optuna.Trial, space: SearchSpace, stage: str, cfg: StageConfig
    ) -> None:
        params = space.suggest(trial)
        overrides = {**params, "trainer.max_epochs": cfg.max_epochs}
        if self.uses_wandb():  # one W&B run per trial, all in the study's group
            overrides["trainer.logger.init_args.name"] = f"{stage}-{trial.number}"
            overrides["trainer.logger.init_args.group"] = self.study_name
        direction = "max" if self.search.direction == "maximize" else "min"
        callbacks: list[Callback] = []
        divergence = None
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
            callbacks.append(PyTorchLightningPruningCallback(trial, monitor=self.search.metric))
        try:
            run, error = run_recipe(
                self.configs,
                overrides,
                monitor=self.search.metric,
                callbacks=callbacks,
                hyperparameters={"trial": trial.number, "stage": stage, **params},
            )
        except BaseException:  # Ctrl-C: record it and queue the same parameters again
            trial.set_user_attr("error", "interrupted")
            study.tell(trial, state=TrialState.FAIL)
            study.enqueue_trial(params, skip_if_exists=False)
            raise
        for name, value in (("epochs", run.epochs), ("steps", run.steps), ("fixed_cost_s", run.fixed_cost_s)):
            trial.set_user_attr(name, value)
        trial.set_user_attr("wall_s", run.wall_s)
        trial.set_user_attr("worker", self.worker)
        self.trial_stats.append({"fixed_cost_s": run.fixed_cost_s, "wall_s": run.wall_s})
        print(
            f"[{self.worker}] {stage} trial {trial.number}: fixed cost {run.fixed_cost_s:.2f} s"
            f" (start -> first batch), total {run.wall_s:.2f} s"
        )
        if divergence is not None and divergence.stopping_reason in _DIVERGED:
            trial.set_user_attr("stopped", f"diverged: {divergence.stopping_reason_message}")
            study.tell(trial, state=TrialState.PRUNED)
        elif isinstance(error, optuna.TrialPruned):
            trial.set_user_attr("stopped", f"pruned: {error}")
            study.tell(trial, state=TrialState.PRUNED)
        elif error is not None:
            trial.set_user_attr("error", f"{type(error).__name__}: {error}"[:2000])
            study.tell(trial, state=TrialState.FAIL)
        elif not math.isfinite(run.value):
            trial.set_user_attr("error", f"`{self.search.metric}` was not logged or not finite: {run.value}")
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, run.value)


def _worker_entry(run: SearchRun) -> None:
    run.run_worker()


def run_search(run: SearchRun, n_jobs: int = 1) -> float:
    """Run the search with ``n_jobs`` worker processes here; returns the wall time in seconds."""
    open_storage(run.storage_url)  # fail now, with the URL, when the storage is unreachable
    started = time.perf_counter()
    if n_jobs <= 1:
        run.run_worker()
    else:
        ctx = multiprocessing.get_context("spawn")
        procs = [
            ctx.Process(target=_worker_entry, args=(_with_worker(run, f"worker-{i}"),), daemon=False)
            for i in range(n_jobs)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join()
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        if bad:
            raise RuntimeError(f"{len(bad)} of {n_jobs} search workers exited with codes {bad}")
    return time.perf_counter() - started


def _with_worker(run: SearchRun, worker: str) -> SearchRun:
    return SearchRun(run.configs, run.search, run.storage_url, run.study_name, run.out_dir, worker=worker)
