"""Search-space parsing, narrowing, log-uniform sampling and every bad-input case (no training)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import LR, WD
from scipy import stats

from lightning_tricks.experiments.search import SearchConfig, sample_trials
from lightning_tricks.experiments.space import SearchSpace
from lightning_tricks.experiments.storage import mask_password, open_storage


def _config(space: dict) -> SearchConfig:
    return SearchConfig.from_dict({"space": space, "coarse": {"n_trials": 2, "max_epochs": 1}})


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"low": 0.0, "high": 1.0, "log": True}, "log range needs low > 0"),
        ({"low": -1e-3, "high": 1.0, "log": True}, "log range needs low > 0"),
        ({"low": 1.0, "high": 0.1}, "low=1.0 > high=0.1"),
        ({"choices": []}, "empty or invalid choice list"),
        ({"low": 1.0}, "needs `low` and `high`"),
    ],
)
def test_unsampleable_space_fails_naming_the_key(spec, message):
    with pytest.raises(ValueError, match=message) as err:
        _config({LR: spec})
    assert LR in str(err.value)


@pytest.mark.parametrize(
    ("key", "spec", "message"),
    [
        ("model.init_args.optimizer.not_a_field", {"low": 0.1, "high": 1.0}, "not_a_field"),
        ("model.init_args.nothing", {"choices": [1, 2]}, "nothing"),
        (LR, {"choices": ["fast", "slow"]}, "Expected a <class 'float'>"),
        ("data.init_args.batch_size", {"low": 8.0, "high": 64.0}, "Expected a <class 'int'>"),
    ],
)
def test_keys_and_types_that_do_not_fit_the_recipe_fail_before_any_trial(recipe, key, spec, message):
    with pytest.raises(ValueError, match=message) as err:
        _config({key: spec}).validate_against([recipe])
    assert f"`{key}`" in str(err.value)
    assert "--print_config" in str(err.value)


def test_fitting_space_passes_validation(recipe):
    _config(
        {LR: {"low": 1e-3, "high": 1.0, "log": True}, "data.init_args.batch_size": {"low": 8, "high": 64}}
    )
    _config({LR: {"low": 1e-3, "high": 1.0, "log": True}}).validate_against([recipe])


def test_unreachable_storage_fails_at_once_with_the_masked_url():
    url = "postgresql://alice:s3cret@127.0.0.1:1/study"
    with pytest.raises(ValueError) as err:
        open_storage(url, timeout_s=2)
    assert "postgresql://alice:***@127.0.0.1:1/study" in str(err.value)
    assert "s3cret" not in str(err.value)
    assert mask_password(url) == "postgresql://alice:***@127.0.0.1:1/study"


def test_log_range_is_sampled_log_uniformly():
    space = SearchSpace.from_dict(
        {LR: {"low": 1e-4, "high": 1.0, "log": True}, WD: {"low": 0.0, "high": 1.0}}
    )
    values = sample_trials(space, 500, seed=3)
    exponents = np.log10([v[LR] for v in values])
    linear = np.array([v[WD] for v in values])
    # log10 of a log-uniform sample on [1e-4, 1] is uniform on [-4, 0]
    assert stats.kstest(exponents, stats.uniform(loc=-4, scale=4).cdf).pvalue > 0.01
    assert stats.kstest(linear, stats.uniform(loc=0, scale=1).cdf).pvalue > 0.01
    # the test has power: the linear parameter is far from log-uniform on its own scale
    assert stats.kstest(np.log10(linear[linear > 1e-4]), stats.uniform(loc=-4, scale=4).cdf).pvalue < 1e-6
    assert all(1e-4 <= v[LR] <= 1.0 for v in values)


def test_narrowing_stays_inside_and_keeps_the_best():
    space = SearchSpace.from_dict(
        {
            LR: {"low": 1e-4, "high": 1.0, "log": True},
            WD: {"low": 0.0, "high": 0.1},
            "data.init_args.batch_size": {"low": 8, "high": 128, "step": 8},
            "model.init_args.model": {"choices": ["mlp", "small_cnn", "resnet20"]},
        }
    )
    rng = np.random.default_rng(0)
    for _ in range(50):
        top = sample_trials(space, 3, seed=int(rng.integers(1 << 30)))
        fine = space.narrow(top, margin=0.1)
        best = top[0]
        for coarse_p, fine_p in zip(space.params, fine.params, strict=True):
            if coarse_p.categorical:
                assert best[coarse_p.key] in fine_p.choices
                assert set(fine_p.choices) <= set(coarse_p.choices)
                continue
            assert coarse_p.low <= fine_p.low <= best[coarse_p.key] <= fine_p.high <= coarse_p.high
            if coarse_p.is_int:
                assert (fine_p.low - coarse_p.low) % 8 == 0 and (fine_p.high - coarse_p.low) % 8 == 0
    # the rule in numbers: log range, top values 1e-3 and 1e-2, margin 0.1 of 4 decades = 0.4 decades
    fine = SearchSpace.from_dict({LR: {"low": 1e-4, "high": 1.0, "log": True}}).narrow(
        [{LR: 1e-2}, {LR: 1e-3}], margin=0.1
    )
    assert math.isclose(fine.params[0].low, 10 ** (-3.4)) and math.isclose(fine.params[0].high, 10 ** (-1.6))


def test_lr_range_test_turns_into_a_log_range_up_to_the_loss_minimum():
    from lightning_tricks.callbacks.lr_finder import LRFinderResults
    from lightning_tricks.experiments.lr_range import lr_search_range

    lrs = list(np.geomspace(1e-5, 10.0, 61))
    smoothed = [(math.log10(lr) + 1.0) ** 2 for lr in lrs]  # minimum at lr = 0.1
    results = LRFinderResults(lrs=lrs, losses=smoothed, smoothed=smoothed)
    low, high = lr_search_range(results)
    assert high == pytest.approx(0.1) and low == pytest.approx(1e-3)
    assert lr_search_range(results, span=1e6)[0] == pytest.approx(1e-5)  # never below the sweep
    with pytest.raises(ValueError, match="at least 2"):
        lr_search_range(LRFinderResults(lrs=[0.1], losses=[1.0], smoothed=[1.0]))


def test_console_command_dispatches_search_and_rejects_bad_input_with_status_2(tmp_path, recipe, capsys):
    from lightning_tricks.cli import main

    search = tmp_path / "search.yaml"
    search.write_text(
        "coarse: {n_trials: 2, max_epochs: 1}\nspace:\n  model.init_args.optimizer.lr: {choices: []}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--config", recipe, "--search", str(search), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_args.optimizer.lr" in err and "empty or invalid choice list" in err
    assert not (tmp_path / "out" / "trials.csv").exists()


@pytest.mark.parametrize("option", ["--heartbeat-interval", "--grace-period", "--n-jobs"])
def test_search_rejects_a_worker_setting_below_1_naming_the_option(tmp_path, recipe, capsys, option):
    from lightning_tricks.cli import main

    search = tmp_path / "search.yaml"
    text = "coarse: {n_trials: 2, max_epochs: 1}\nspace: {data.init_args.batch_size: {choices: [8]}}\n"
    search.write_text(text)
    out = str(tmp_path / "out")
    with pytest.raises(SystemExit) as exit_info:
        main(["search", "--config", recipe, "--search", str(search), "--out", out, option, "0"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{option} must be" in err and "got 0" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["search", "ablate"])
def test_a_missing_experiment_file_is_named_without_a_traceback(tmp_path, recipe, capsys, command):
    from lightning_tricks.cli import main

    missing = str(tmp_path / "nowhere.yaml")
    args = ["--config", recipe, "--search", missing] if command == "search" else ["--ablation", missing]
    with pytest.raises(SystemExit) as exit_info:
        main([command, *args, "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"--{'search' if command == 'search' else 'ablation'} {missing} is not a file" in err
    assert "Traceback" not in err and not (tmp_path / "out").exists()
