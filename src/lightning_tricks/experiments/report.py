"""The end of a search: trial table, best config as ready-to-run YAML, Optuna plots, summary JSON.

Files in ``out_dir``: ``trials.csv`` (every trial of every stage), ``best.yaml`` (run it with
``lightning-tricks fit --config best.yaml``), ``history_<stage>.png`` (optimisation history),
``slice_<stage>.png`` (objective vs each hyperparameter, log axes on log ranges) and ``summary.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import optuna
import yaml
from optuna.trial import TrialState

from lightning_tricks._io import atomic_savefig, atomic_write_bytes
from lightning_tricks.experiments.recipe import parse_recipe
from lightning_tricks.experiments.search import STAGES, SearchRun, best_trials
from lightning_tricks.experiments.storage import open_storage


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
                "note": t.user_attrs.get("stopped", t.user_attrs.get("error", "")),
            }
        )
    rows.sort(key=lambda r: (r["rank"] == "", r["rank"] or 0, r["trial"]))
    return rows


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


def write_report(run: SearchRun, wall_s: float | None = None) -> dict[str, Any]:
    """Print the trial table and write every report file; returns the summary."""
    storage = open_storage(run.storage_url)
    out = run.out_dir
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"study": run.study_name, "metric": run.search.metric, "stages": {}}
    rows: list[dict[str, Any]] = []
    final_best: tuple[optuna.trial.FrozenTrial, int] | None = None
    for stage in STAGES:
        cfg = getattr(run.search, stage)
        if cfg is None:
            continue
        try:
            study = optuna.load_study(study_name=run.stage_name(stage), storage=storage)
        except KeyError:
            continue
        stage_rows = trial_rows(study, stage)
        rows += stage_rows
        states = [t.state for t in study.get_trials(deepcopy=False)]
        costs = [
            t.user_attrs["fixed_cost_s"]
            for t in study.get_trials(deepcopy=False)
            if "fixed_cost_s" in t.user_attrs
        ]
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
        print(f"\n{stage} stage ({run.stage_name(stage)}), {cfg.max_epochs} epochs per trial:")
        print(format_table(stage_rows))
        if best:
            final_best = (best[0], cfg.max_epochs)
        _plots(study, stage, out)
    if rows:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(out / "trials.csv", buf.getvalue())
    if final_best is not None:
        trial, epochs = final_best
        config = parse_recipe(run.configs, {**trial.params, "trainer.max_epochs": epochs})
        header = (
            f"# Best trial of study {run.study_name!r}: {run.search.metric} = {trial.value:.6g}\n"
            f"#   lightning-tricks fit --config {out / 'best.yaml'}\n"
        )
        write_atomic(out / "best.yaml", header + yaml.safe_dump(config, sort_keys=False))
        summary["best"] = {"value": trial.value, "params": trial.params, "max_epochs": epochs}
        print(
            f"\nBest {run.search.metric} = {trial.value:.4g} with {trial.params}; config: {out / 'best.yaml'}"
        )
    if wall_s is not None:
        n = sum(sum(s["states"].values()) for s in summary["stages"].values())
        summary["wall_s"] = wall_s
        summary["trials_per_minute"] = n / (wall_s / 60.0) if wall_s > 0 else None
        print(f"{n} trials in {wall_s:.1f} s: {summary['trials_per_minute']:.2f} trials/minute")
    for stage, info in summary["stages"].items():
        if info["fixed_cost_s_median"] is not None:
            print(
                f"{stage}: fixed cost per trial (start -> first training batch): first"
                f" {info['fixed_cost_s_first']:.2f} s, median {info['fixed_cost_s_median']:.2f} s"
            )
    write_atomic(out / "summary.json", json.dumps(summary, indent=2, default=str))
    return summary


def _plots(study: optuna.Study, stage: str, out: Path) -> None:
    if not best_trials(study):
        return
    from optuna.visualization import matplotlib as optuna_plots

    _save_plot(optuna_plots.plot_optimization_history(study), out / f"history_{stage}.png")
    _save_plot(optuna_plots.plot_slice(study), out / f"slice_{stage}.png")
