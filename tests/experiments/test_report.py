"""The search report: written once by whichever worker gets there first, a function of the study."""

from __future__ import annotations

import csv
import json
import multiprocessing
from datetime import datetime, timedelta

import optuna
import pytest
import yaml
from conftest import LR, WD
from optuna.trial import FrozenTrial, TrialState

from lightning_tricks.experiments.report import write_report
from lightning_tricks.experiments.search import SearchConfig, SearchRun

START = datetime(2026, 1, 1, 12, 0, 0)


def _add(study: optuna.Study, config: SearchConfig, number: int, value: float, lr: float) -> None:
    """A finished trial that started 10 s after the previous one and ran 8 s."""
    study.add_trial(
        FrozenTrial(
            number=number,
            state=TrialState.COMPLETE,
            value=value,
            datetime_start=START + timedelta(seconds=10 * number),
            datetime_complete=START + timedelta(seconds=10 * number + 8),
            params={LR: lr, WD: lr / 1000},
            distributions=config.space.distributions(),
            user_attrs={"epochs": 1},
            system_attrs={},
            intermediate_values={},
            trial_id=number,
        )
    )


def _csv(run: SearchRun) -> list[dict[str, str]]:
    with (run.out_dir / "trials.csv").open() as f:
        return list(csv.DictReader(f))


def test_workers_that_finish_one_study_write_its_report_once_and_alike(tmp_path, recipe):
    space = {LR: {"low": 1e-3, "high": 1.0, "log": True}, WD: {"low": 1e-6, "high": 1e-2, "log": True}}
    config = SearchConfig.from_dict({"space": space, "coarse": {"n_trials": 3, "max_epochs": 1}})
    run = SearchRun([recipe], config, f"sqlite:///{tmp_path / 'study.db'}", "report", tmp_path / "out")
    study = optuna.create_study(
        storage=run.storage_url, study_name=run.stage_name("coarse"), direction="maximize"
    )
    study.set_user_attr("space", config.space.as_dict())
    for number, (value, lr) in enumerate([(0.5, 0.01), (0.8, 0.1), (0.3, 0.5)]):
        _add(study, config, number, value, lr)

    with multiprocessing.get_context("spawn").Pool(2) as pool:  # two workers finishing together
        summaries = pool.starmap(write_report, [(run, 11.0), (run, 22.0)])
    assert sorted(s.pop("report") for s in summaries) == ["unchanged", "written"]
    assert summaries[0] == summaries[1]  # the same report whoever writes it, whatever its own time

    summary = json.loads((run.out_dir / "summary.json").read_text())
    assert summary["wall_s"] == 28.0  # first start 12:00:00 to last end 12:00:28
    assert summary["trials_per_minute"] == pytest.approx(3 / (28 / 60))
    rows = _csv(run)
    assert [(r["trial"], r["rank"], float(r["value"])) for r in rows] == [
        ("1", "1", 0.8),
        ("0", "2", 0.5),
        ("2", "3", 0.3),
    ]
    best = yaml.safe_load((run.out_dir / "best.yaml").read_text())
    assert best["model"]["init_args"]["optimizer"]["lr"] == 0.1
    assert not list(run.out_dir.glob(".*.tmp"))

    _add(study, config, 3, 0.9, 0.3)  # the study changed: the report follows
    assert write_report(run)["report"] == "written"
    assert [r["trial"] for r in _csv(run)] == ["3", "1", "0", "2"]
    best = yaml.safe_load((run.out_dir / "best.yaml").read_text())
    assert best["model"]["init_args"]["optimizer"]["lr"] == 0.3
    before = (run.out_dir / "summary.json").stat()
    assert write_report(run)["report"] == "unchanged"
    after = (run.out_dir / "summary.json").stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
