"""The shipped CIFAR-10 speedrun ablation: each variant changes exactly its piece, and the runner reads it."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from data_files import accept_checksums, write_cifar10

from lightning_tricks.cli import build_cli
from lightning_tricks.experiments import ablation as ablation_lib
from lightning_tricks.experiments.ablation import AblationConfig, run_ablation
from lightning_tricks.experiments.recipe import recipe_args

ABLATION = Path(__file__).parents[2] / "configs" / "ablations" / "cifar10_speedrun.yaml"
MISSING = "<missing>"
M, D, EMA = "model.init_args.", "data.init_args.", "trainer.callbacks.1.init_args."
# The leaves of the full `fit` config that each variant changes, against the base (MISSING: removed).
EXPECTED = {
    "no_whitening": {M + "model_kwargs.whitening": False},
    "no_whitening_bias_freeze": {M + "model_kwargs.whitening_bias_epochs": None},
    "no_lookahead": {EMA + "lookahead": None},
    "no_label_smoothing": {M + "regularization.label_smoothing": 0.0},
    "no_norm_bias_lr": {M + "optimizer.lr_multipliers.norm_bias": MISSING},
    "no_tta": {M + "tta": None},
    "no_channels_last": {M + "channels_last": False},
    "plus_compile": {M + "compile": "default"},
    "random_flip": {D + "flip_mode": "random"},
    "per_sample_loader": {
        D + "augment_on_device": False,
        D + "data_on_device": False,
        D + "num_workers": 8,
        D + "flip_mode": "random",
    },
}


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted leaves of nested dicts/lists (list items by index)."""
    if isinstance(node, dict):
        items = node.items()
    elif isinstance(node, list):
        items = enumerate(node)
    else:
        return {prefix[:-1]: node}
    return {key: value for k, v in items for key, value in flatten(v, f"{prefix}{k}.").items()}


def changed(base: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    return {
        k: other.get(k, MISSING)
        for k in base.keys() | other.keys()
        if base.get(k, MISSING) != other.get(k, MISSING)
    }


def test_every_speedrun_variant_builds_and_changes_exactly_its_piece():
    config = AblationConfig.from_yaml(ABLATION)
    assert config.variants[0].name == "baseline" and config.metric == "test/acc_tta"
    assert {v.name for v in config.variants[1:]} == set(EXPECTED) | {"no_ema"}
    dumps, built = {}, {}
    for variant in config.variants:  # every class built as `fit` builds it, nothing trained
        cli = build_cli(recipe_args(config.recipe + variant.configs, variant.overrides), run=False)
        dumps[variant.name] = flatten(yaml.safe_load(cli.parser.dump(cli.config, skip_none=False)))
        built[variant.name] = cli
    base = dumps["baseline"]
    assert base[EMA + "lookahead"] == 1.0 and base[M + "model_kwargs.whitening_bias_epochs"] == 3
    for name, expected in EXPECTED.items():
        assert changed(base, dumps[name]) == expected, name
    removed = changed(base, dumps["no_ema"])
    assert removed and set(removed.values()) == {MISSING}
    assert removed.keys() == {k for k in base if k.startswith("trainer.callbacks.1.")}

    def ema(name):
        return [cb for cb in built[name].trainer.callbacks if type(cb).__name__ == "EMA"]

    assert [cb.lookahead for cb in ema("baseline")] == [1.0] and [
        cb.lookahead for cb in ema("no_lookahead")
    ] == [None]
    assert ema("no_ema") == []
    assert built["baseline"].model.net.whitening and not built["no_whitening"].model.net.whitening
    assert built["no_whitening"].model.net.whiten.weight.requires_grad
    assert not built["per_sample_loader"].datamodule.augment_on_device
    assert {v.name: v.metric for v in config.variants if v.metric} == {"no_tta": "test/acc"}


def test_speedrun_ablation_runs_on_cifar_files_and_reports_what_each_run_logged(tmp_path, monkeypatch):
    write_cifar10(tmp_path, per_batch=20, n_test=16)
    accept_checksums(monkeypatch, tmp_path)
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(
        yaml.safe_dump(
            {
                "trainer": {
                    "accelerator": "cpu",
                    "devices": 1,
                    "max_epochs": 1,
                    "limit_train_batches": 5,  # the EMA (start_step 4) updates once
                    "enable_progress_bar": False,
                    "default_root_dir": str(tmp_path / "runs"),
                },
                "model": {"init_args": {"model_kwargs": {"widths": [8, 16, 16], "whitening_bias_epochs": 3}}},
                "data": {"init_args": {"data_dir": str(tmp_path), "download": False, "batch_size": 16}},
            }
        )
    )
    config = AblationConfig.from_yaml(ABLATION).select(["no_tta"])
    config.recipe = [*config.recipe, str(tiny)]
    config.seeds = [0, 1]  # the runner's paired statistics need two seeds
    logged: list[dict[str, float]] = []
    real_run_recipe = ablation_lib.run_recipe

    def recording_run_recipe(*args, **kwargs):
        run, error = real_run_recipe(*args, **kwargs)
        logged.append(dict(run.metrics))
        return run, error

    monkeypatch.setattr(ablation_lib, "run_recipe", recording_run_recipe)
    summary = run_ablation(config, tmp_path / "out")

    with open(tmp_path / "out" / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"], r["metric"]) for r in rows] == [
        ("baseline", "0", "test/acc_tta"),
        ("baseline", "1", "test/acc_tta"),
        ("no_tta", "0", "test/acc"),
        ("no_tta", "1", "test/acc"),
    ]
    assert [float(r["value"]) for r in rows] == pytest.approx(
        [m[r["metric"]] for m, r in zip(logged, rows, strict=True)]
    )
    assert all("test/acc_tta" not in m for m in logged[2:])  # TTA really off in the variant
    # TTA acts only at test time: the variant's plain accuracy is the base run's, seed by seed.
    assert [m["test/acc"] for m in logged[2:]] == [m["test/acc"] for m in logged[:2]]
    saved = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [(r["variant"], r["metric"]) for r in saved["rows"]] == [
        ("baseline", "test/acc_tta"),
        ("no_tta", "test/acc"),
    ]
    assert saved["rows"] == summary["rows"]
