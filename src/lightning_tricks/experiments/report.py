"""The end of a search: trial table, best config as ready-to-run YAML, Optuna plots, summary JSON.

Files in ``out_dir``: ``trials.csv`` (every trial of every stage), ``best.yaml`` (run it with
``lightning-tricks fit --config best.yaml``), ``history_<stage>.png`` (optimisation history),
``slice_<stage>.png`` (objective vs each hyperparameter, log axes on log ranges) and ``summary.json``
(written last, with the study's ``fingerprint``). Every worker that finishes a study may call
:func:`write_report`; one writes, the others find the report up to date.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import statistics
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import optuna
import yaml
from filelock import FileLock
from optuna.trial import TrialState

from lightning_tricks._io import atomic_savefig, atomic_write_bytes
from lightning_tricks.experiments.recipe import parse_recipe
from lightning_tricks.experiments.search import STAGES, SearchRun, best_trials
from lightning_tricks.experiments.storage import open_storage, retried_trial_number

Studies = Sequence[tuple[str, optuna.Study]]  # (stage, its study), coarse first


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` atomically (readers never see half a file), creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(text.encode(), path)


def trial_rows(study: optuna.Study, stage: str) -> list[dict[str, Any]]:
    """One row per trial: rank (completed trials, best = 1), value, parameters, epochs, state."""
    ranks = {t.number: i + 1 for i, t in enumerate(best_trials(study))}
    rows = []
    for t in study.get_trials(deepcopy=False):
        rows.append(
            {
                "stage": stage,
                "trial": t.number,
                "rank": ranks.get(t.number, ""),
                "state": t.state.name,
                "value": "" if t.value is None else t.value,
                **t.params,
                "epochs": t.user_attrs.get("epochs", ""),
                "steps": t.user_attrs.get("steps", ""),
                "fixed_cost_s": t.user_attrs.get("fixed_cost_s", ""),
                "retry_of": "" if retried_trial_number(t) is None else retried_trial_number(t),
                "note": _note(t),
            }
        )
    rows.sort(key=lambda r: (r["rank"] == "", r["rank"] or 0, r["trial"]))
    return rows


def _note(trial: optuna.trial.FrozenTrial) -> str:
    """Why a trial did not complete (a retry inherits its original's attributes, so only then)."""
    if trial.state == TrialState.COMPLETE:
        return ""
    if trial.state == TrialState.PRUNED:
        return trial.user_attrs.get("stopped", "")
    if trial.state == TrialState.FAIL:
        return trial.user_attrs.get("error", "worker lost (no heartbeat within the grace period)")
    return ""


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    if not rows:
        return "(no trials)"
    columns = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)[:60]

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _save_plot(axes: Any, path: Path) -> None:
    first = axes.flat[0] if hasattr(axes, "flat") else axes
    fig = first.figure
    fig.set_size_inches(max(6.0, 4.0 * (axes.size if hasattr(axes, "size") else 1)), 4.0)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)


def study_fingerprint(studies: Studies) -> str:
    """A digest of every trial's number, state, value, parameters and attributes, stage by stage."""
    state = [
        [
            stage,
            study.user_attrs.get("space"),
            [
                (t.number, t.state.name, t.value, t.params, t.user_attrs, t.datetime_complete)
                for t in study.get_trials(deepcopy=False)
            ],
        ]
        for stage, study in studies
    ]
    return hashlib.sha256(json.dumps(state, sort_keys=True, default=str).encode()).hexdigest()


def _study_span_s(studies: Studies) -> float | None:
    """Seconds from the first trial's start to the last trial's end, over every stage and worker."""
    trials = [t for _, study in studies for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    if not trials:
        return None
    starts = [t.datetime_start for t in trials if t.datetime_start is not None]
    return (max(t.datetime_complete for t in trials) - min(starts)).total_seconds() if starts else None


def write_report(run: SearchRun, wall_s: float | None = None) -> dict[str, Any]:
    """Print the trial table and write every report file; returns the summary.

    The files are a function of the study alone (``wall_s``, this command's own time, is only
    printed), each is written atomically, and writers take turns on a lock file in ``out_dir``: of
    several workers that finish the same study, the first writes and the others find the report up
    to date (same ``fingerprint`` in ``summary.json``) and leave it as it is. The returned summary
    says which happened under ``"report"`` (``"written"`` or ``"unchanged"``).
    """
    storage = open_storage(run.storage_url)
    out = run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    studies = []
    for stage in STAGES:
        if getattr(run.search, stage) is None:
            continue
        try:
            studies.append((stage, optuna.load_study(study_name=run.stage_name(stage), storage=storage)))
        except KeyError:
            continue
    with FileLock(out / ".report.lock"):
        fingerprint = study_fingerprint(studies)
        summary = _summary(run, studies, fingerprint)
        if wall_s is not None:
            n = sum(sum(s["states"].values()) for s in summary["stages"].values())
            print(f"{n} trials, this command {wall_s:.1f} s")
        if _read_fingerprint(out / "summary.json") == fingerprint:
            print(f"The report in {out} is up to date with the study.")
            return {**summary, "report": "unchanged"}
        _write_files(run, studies, summary)
    return {**summary, "report": "written"}


def _read_fingerprint(path: Path) -> str | None:
    try:
        return json.loads(path.read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None


def _summary(run: SearchRun, studies: Studies, fingerprint: str) -> dict[str, Any]:
    summary: dict[str, Any] = {
        "study": run.study_name,
        "metric": run.search.metric,
        "fingerprint": fingerprint,
        "stages": {},
    }
    for stage, study in studies:
        cfg = getattr(run.search, stage)
        trials = study.get_trials(deepcopy=False)
        states = [t.state for t in trials]
        costs = [t.user_attrs["fixed_cost_s"] for t in trials if "fixed_cost_s" in t.user_attrs]
        costs = [c for c in costs if math.isfinite(c)]
        best = best_trials(study, 1)
        summary["stages"][stage] = {
            "space": study.user_attrs.get("space"),
            "max_epochs": cfg.max_epochs,
            "states": {s.name: states.count(s) for s in TrialState if states.count(s)},
            "best_value": best[0].value if best else None,
            "best_params": best[0].params if best else None,
            "fixed_cost_s_median": statistics.median(costs) if costs else None,
            "fixed_cost_s_first": costs[0] if costs else None,
        }
        if best:
            summary["best"] = {"value": best[0].value, "params": best[0].params, "max_epochs": cfg.max_epochs}
    span = _study_span_s(studies)
    if span:
        n = sum(sum(s["states"].values()) for s in summary["stages"].values())
        summary["wall_s"] = span
        summary["trials_per_minute"] = n / (span / 60.0)
    return summary


def _write_files(run: SearchRun, studies: Studies, summary: dict[str, Any]) -> None:
    out = run.out_dir
    rows: list[dict[str, Any]] = []
    for stage, study in studies:
        cfg = getattr(run.search, stage)
        stage_rows = trial_rows(study, stage)
        rows += stage_rows
        print(f"\n{stage} stage ({run.stage_name(stage)}), {cfg.max_epochs} epochs per trial:")
        print(format_table(stage_rows))
        _plots(study, stage, out)
    if rows:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(out / "trials.csv", buf.getvalue())
    best = summary.get("best")
    if best is not None:
        config = parse_recipe(run.configs, {**best["params"], "trainer.max_epochs": best["max_epochs"]})
        header = (
            f"# Best trial of study {run.study_name!r}: {run.search.metric} = {best['value']:.6g}\n"
            f"#   lightning-tricks fit --config {out / 'best.yaml'}\n"
        )
        write_atomic(out / "best.yaml", header + yaml.safe_dump(config, sort_keys=False))
        print(
            f"\nBest {run.search.metric} = {best['value']:.4g} with {best['params']};"
            f" config: {out / 'best.yaml'}"
        )
    if "trials_per_minute" in summary:
        print(
            f"Study: {summary['wall_s']:.1f} s from the first trial's start to the last one's end,"
            f" {summary['trials_per_minute']:.2f} trials/minute"
        )
    for stage, info in summary["stages"].items():
        if info["fixed_cost_s_median"] is not None:
            print(
                f"{stage}: fixed cost per trial (start -> first training batch): first"
                f" {info['fixed_cost_s_first']:.2f} s, median {info['fixed_cost_s_median']:.2f} s"
            )
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str))  # last: marks it done


def _plots(study: optuna.Study, stage: str, out: Path) -> None:
    if not best_trials(study):
        return
    from optuna.visualization import matplotlib as optuna_plots

    with warnings.catch_warnings():
        # Optuna's matplotlib plots are marked experimental since v2.2 and stable in use since;
        # the report's own files are what users read, so the marker is not repeated to them.
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        _save_plot(optuna_plots.plot_optimization_history(study), out / f"history_{stage}.png")
        _save_plot(optuna_plots.plot_slice(study), out / f"slice_{stage}.png")
