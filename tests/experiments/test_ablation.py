"""Ablation statistics against an independent computation, and the runner on real digits runs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import yaml
from scipy import stats

from lightning_tricks.experiments.ablation import (
    AblationConfig,
    Variant,
    paired_statistics,
    run_ablation,
    summarize,
)


def _independent(base, variant, confidence):
    base, variant = np.asarray(base), np.asarray(variant)
    ci = stats.ttest_rel(variant, base).confidence_interval(confidence)
    return variant.mean(), variant.std(ddof=1), (variant - base).mean(), ci.low, ci.high


@pytest.mark.parametrize("confidence", [0.9, 0.95])
def test_paired_statistics_equal_an_independent_computation(confidence):
    rng = np.random.default_rng(7)
    base = rng.uniform(0.8, 0.9, size=6)
    variant = base + rng.normal(0.02, 0.01, size=6)
    got = paired_statistics(list(base), list(variant), confidence)
    mean, sd, diff, low, high = _independent(base, variant, confidence)
    assert got["mean"] == pytest.approx(mean, rel=1e-12)
    assert got["sd"] == pytest.approx(sd, rel=1e-12)
    assert got["diff_mean"] == pytest.approx(diff, rel=1e-12)
    assert got["diff_ci_low"] == pytest.approx(low, rel=1e-10)
    assert got["diff_ci_high"] == pytest.approx(high, rel=1e-10)


def test_paired_statistics_reject_unpaired_samples():
    with pytest.raises(ValueError, match="equal lengths >= 2"):
        paired_statistics([0.9, 0.8], [0.9])


def test_ablation_file_errors_name_the_problem(tmp_path):
    path = tmp_path / "ablation.yaml"
    path.write_text(yaml.safe_dump({"recipe": "r.yaml", "seeds": [0], "variants": {"a": {}, "b": {}}}))
    with pytest.raises(ValueError, match="at least 2 distinct"):
        AblationConfig.from_yaml(path)
    path.write_text(yaml.safe_dump({"recipe": "r.yaml", "variants": {"a": {}}}))
    with pytest.raises(ValueError, match="a base and at least one variant"):
        AblationConfig.from_yaml(path)


def test_runner_on_digits_matches_the_statistics_of_its_own_per_seed_results(tmp_path, recipe):
    config = AblationConfig(
        recipe=[recipe],
        variants=[
            Variant("baseline"),
            Variant("label_smoothing", {"model.init_args.regularization.label_smoothing": 0.2}),
        ],
        metric="test/acc",
        seeds=[0, 1, 2],
        seed_keys=["seed_everything", "data.init_args.seed"],
    )
    summary = run_ablation(config, tmp_path / "out")
    with open(tmp_path / "out" / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    per_variant = {
        name: [float(r["value"]) for r in runs if r["variant"] == name]
        for name in ("baseline", "label_smoothing")
    }
    assert len(per_variant["baseline"]) == 3
    # different seeds give different test accuracies (seed_keys reach the recipe)
    assert len(set(per_variant["baseline"])) > 1
    row = summary["rows"][1]
    mean, sd, diff, low, high = _independent(per_variant["baseline"], per_variant["label_smoothing"], 0.95)
    assert (row["mean"], row["sd"], row["diff_mean"]) == pytest.approx((mean, sd, diff), rel=1e-9)
    assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx((low, high), rel=1e-9)
    assert summary == summarize(config, per_variant)
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["rows"] == summary["rows"]
    assert (tmp_path / "out" / "ablation.png").stat().st_size > 0


def test_shipped_ablation_and_search_files_fit_their_recipes():
    from pathlib import Path

    from lightning_tricks.experiments.search import SearchConfig

    configs = Path(__file__).parents[2] / "configs"
    ablation = AblationConfig.from_yaml(configs / "ablations" / "digits_few_labels.yaml")
    ablation.check()  # every variant parses against the base recipe
    assert ablation.variants[0].name == "baseline" and len(ablation.variants) >= 8
    search = SearchConfig.from_yaml(configs / "search" / "digits_lr_wd.yaml")
    search.validate_against([str(configs / "search" / "digits_mlp.yaml")])
