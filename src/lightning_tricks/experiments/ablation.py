"""Ablations: a base recipe and named variants over several seeds, with paired statistics.

The ablation file (YAML; paths relative to the file)::

    recipe: [../digits_few_labels.yaml]     # LightningCLI config(s) of the base recipe
    metric: test/acc                          # read after `fit` + `test`
    seeds: [0, 1, 2, 3, 4]
    seed_keys: [seed_everything, data.init_args.seed]   # every key gets the seed
    variants:                                  # the first one is the base
      baseline: {}
      label_smoothing: {model.init_args.regularization.label_smoothing: 0.1}
      ema:
        overrides: {trainer.callbacks+: {class_path: lightning_tricks.callbacks.EMA}}
        metric: test/acc                        # optional per-variant metric
        config: [fragment.yaml]                 # optional extra config files

A variant is either dotted overrides or a mapping with ``overrides``/``config``/``metric``. With the
same seed, the base and a variant share data split, subset and initialisation seed, so the
difference per seed is a paired sample: the runner reports its mean and a Student-t confidence
interval (``mean ± t(1 - (1 - confidence) / 2, n - 1) · sd / √n``), beside mean ± sd of every variant.

Example::

    config = AblationConfig.from_yaml("configs/ablations/digits_few_labels.yaml")
    summary = run_ablation(config, Path("runs/ablations/digits_few_labels"))
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from scipy import stats as scipy_stats

from lightning_tricks._io import atomic_savefig
from lightning_tricks.experiments.recipe import parse_recipe, run_recipe
from lightning_tricks.experiments.report import format_table, write_atomic


@dataclass
class Variant:
    """A named change of the base recipe."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    configs: list[str] = field(default_factory=list)
    metric: str | None = None

    @classmethod
    def from_spec(cls, name: str, spec: Any, root: Path) -> Variant:
        if spec is None:
            spec = {}
        if not isinstance(spec, Mapping):
            raise ValueError(f"Variant `{name}` must be a mapping of dotted overrides, got {spec!r}.")
        if not ({"overrides", "config", "metric"} & set(spec)):
            return cls(name, dict(spec))
        extra = set(spec) - {"overrides", "config", "metric"}
        if extra:
            raise ValueError(
                f"Variant `{name}` mixes `overrides`/`config`/`metric` with keys {sorted(extra)}."
            )
        configs = spec.get("config") or []
        configs = [configs] if isinstance(configs, str) else list(configs)
        return cls(
            name, dict(spec.get("overrides") or {}), [str(root / c) for c in configs], spec.get("metric")
        )


@dataclass
class AblationConfig:
    """The parsed ablation file (see the module docstring)."""

    recipe: list[str]
    variants: list[Variant]
    metric: str = "test/acc"
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed_keys: list[str] = field(default_factory=lambda: ["seed_everything"])
    confidence: float = 0.95

    @classmethod
    def from_yaml(cls, path: str | Path) -> AblationConfig:
        path = Path(path)
        data = yaml.safe_load(path.read_text())
        known = {"recipe", "variants", "metric", "seeds", "seed_keys", "confidence"}
        if not isinstance(data, Mapping) or not {"recipe", "variants"} <= set(data):
            raise ValueError(
                f"{path} needs `recipe:` (config files) and `variants:` (the first is the base)."
            )
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(known)}.")
        recipe = data["recipe"]
        recipe = [recipe] if isinstance(recipe, str) else list(recipe)
        variants = [Variant.from_spec(str(k), v, path.parent) for k, v in (data["variants"] or {}).items()]
        rest = {k: data[k] for k in ("metric", "seeds", "seed_keys", "confidence") if k in data}
        config = cls([str(path.parent / r) for r in recipe], variants, **rest)
        config.validate()
        return config

    def validate(self) -> None:
        if len(self.variants) < 2:
            raise ValueError(f"An ablation needs a base and at least one variant, got {len(self.variants)}.")
        if len(self.seeds) < 2 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be at least 2 distinct integers (for a spread), got {self.seeds}.")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"confidence must be in (0, 1), got {self.confidence}.")

    def select(self, names: Sequence[str]) -> AblationConfig:
        known = [v.name for v in self.variants]
        missing = [n for n in names if n not in known]
        if missing:
            raise ValueError(f"Unknown variants {missing}; the file defines {known}.")
        kept = [self.variants[0]] + [v for v in self.variants[1:] if v.name in names]
        return AblationConfig(self.recipe, kept, self.metric, self.seeds, self.seed_keys, self.confidence)

    def check(self) -> None:
        """Fail before any run when a variant's override does not fit the recipe."""
        for variant in self.variants:
            try:
                parse_recipe(self.recipe + variant.configs, variant.overrides)
            except ValueError as err:
                raise ValueError(f"Variant `{variant.name}`: {err}") from None


def paired_statistics(
    base: Sequence[float], variant: Sequence[float], confidence: float = 0.95
) -> dict[str, float]:
    """Mean ± sd of ``variant`` and the paired difference ``variant - base`` with a t-interval."""
    if len(base) != len(variant) or len(base) < 2:
        raise ValueError(f"paired samples need equal lengths >= 2, got {len(base)} and {len(variant)}")
    diffs = [v - b for b, v in zip(base, variant, strict=True)]
    n = len(diffs)
    mean_diff = statistics.fmean(diffs)
    sd_diff = statistics.stdev(diffs)
    half = scipy_stats.t.ppf(0.5 + confidence / 2.0, n - 1) * sd_diff / math.sqrt(n)
    return {
        "n": n,
        "mean": statistics.fmean(variant),
        "sd": statistics.stdev(variant),
        "diff_mean": mean_diff,
        "diff_sd": sd_diff,
        "diff_ci_low": mean_diff - half,
        "diff_ci_high": mean_diff + half,
    }


def run_ablation(config: AblationConfig, out: Path) -> dict[str, Any]:
    """Run every variant with every seed, print the table, write CSV/JSON and a plot."""
    config.check()
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[float]] = {}
    runs: list[dict[str, Any]] = []
    for variant in config.variants:
        metric = variant.metric or config.metric
        results[variant.name] = []
        for seed in config.seeds:
            overrides = {**variant.overrides, **{key: seed for key in config.seed_keys}}
            run, error = run_recipe(config.recipe + variant.configs, overrides, test=True)
            if error is not None:
                raise RuntimeError(f"Variant `{variant.name}` seed {seed} failed: {error!r}") from error
            if metric not in run.metrics:
                raise KeyError(
                    f"Variant `{variant.name}` logged no `{metric}`; logged: {sorted(run.metrics)}"
                )
            value = run.metrics[metric]
            results[variant.name].append(value)
            runs.append(
                {
                    "variant": variant.name,
                    "seed": seed,
                    "metric": metric,
                    "value": value,
                    "wall_s": run.wall_s,
                }
            )
            print(f"ablation {variant.name} seed {seed}: {metric} = {value:.4f} ({run.wall_s:.1f} s)")
    summary = summarize(config, results)
    _write(config, out, runs, summary)
    return summary


def summarize(config: AblationConfig, results: Mapping[str, Sequence[float]]) -> dict[str, Any]:
    """Per-variant statistics against the base (the first variant)."""
    base_name = config.variants[0].name
    base = list(results[base_name])
    rows = []
    for variant in config.variants:
        values = list(results[variant.name])
        row = {"variant": variant.name, "metric": variant.metric or config.metric}
        row.update(paired_statistics(base, values, config.confidence))
        rows.append(row)
    return {"base": base_name, "seeds": list(config.seeds), "confidence": config.confidence, "rows": rows}


def _write(config: AblationConfig, out: Path, runs: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(runs[0]))
    writer.writeheader()
    writer.writerows(runs)
    write_atomic(out / "runs.csv", buf.getvalue())
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(summary["rows"][0]))
    writer.writeheader()
    writer.writerows(summary["rows"])
    write_atomic(out / "summary.csv", buf.getvalue())
    write_atomic(out / "summary.json", json.dumps({**summary, "runs": runs}, indent=2))
    print(format_table(summary["rows"]))
    print(markdown_table(summary))
    _plot(summary, out / "ablation.png")


def markdown_table(summary: Mapping[str, Any]) -> str:
    """The README's table: mean ± sd per variant and the paired difference with its interval."""
    pct = round(summary["confidence"] * 100)
    lines = [
        f"| variant | metric | mean ± sd | Δ vs {summary['base']} (paired) | {pct}% CI of Δ |",
        "|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        lines.append(
            f"| {r['variant']} | {r['metric']} | {r['mean']:.4f} ± {r['sd']:.4f} | {r['diff_mean']:+.4f}"
            f" | [{r['diff_ci_low']:+.4f}, {r['diff_ci_high']:+.4f}] |"
        )
    return "\n".join(lines)


def _plot(summary: Mapping[str, Any], path: Path) -> None:
    import matplotlib.pyplot as plt

    rows = summary["rows"]
    names = [r["variant"] for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 0.5 * len(rows) + 1.5), sharey=True)
    ys = list(range(len(rows)))
    left.errorbar([r["mean"] for r in rows], ys, xerr=[r["sd"] for r in rows], fmt="o", capsize=3)
    left.set_yticks(ys, names)
    left.set_xlabel("metric, mean ± sd over seeds")
    lows = [r["diff_mean"] - r["diff_ci_low"] for r in rows]
    highs = [r["diff_ci_high"] - r["diff_mean"] for r in rows]
    right.errorbar([r["diff_mean"] for r in rows], ys, xerr=[lows, highs], fmt="o", capsize=3, color="C1")
    right.axvline(0.0, color="grey", lw=1)
    right.set_xlabel(f"paired Δ vs {summary['base']}, {round(summary['confidence'] * 100)}% CI")
    left.invert_yaxis()
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=100)
    plt.close(fig)
