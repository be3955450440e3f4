"""A search space declared in YAML by dotted LightningCLI config keys, as Optuna distributions.

Each entry maps a dotted key of the recipe (``model.init_args.optimizer.lr``) to a range or a
choice list::

    model.init_args.optimizer.lr: {low: 1.0e-4, high: 1.0, log: true}     # float, log-uniform
    model.init_args.regularization.dropout: {low: 0.0, high: 0.5}           # float, uniform
    data.init_args.batch_size: {low: 16, high: 128, step: 16}               # int (both bounds ints)
    model.init_args.model: {choices: [small_cnn, mlp]}                      # categorical

Narrowing (coarse -> fine, :meth:`SearchSpace.narrow`): take the ``top_k`` best coarse trials; for
a numeric parameter the fine range is the smallest interval holding their values, widened by
``margin`` times the coarse width on each side and clipped to the coarse range. Log ranges are
narrowed in ``log10`` space (so the margin is a factor, not an offset). Int ranges are rounded
outwards onto their step grid. A categorical keeps the choices that occur among the ``top_k``
trials. The fine range therefore always lies inside the coarse range and holds the best value.

Example::

    space = SearchSpace.from_dict({"model.init_args.optimizer.lr": {"low": 1e-4, "high": 1.0, "log": True}})
    fine = space.narrow([{"model.init_args.optimizer.lr": 0.02}], margin=0.1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

_RANGE_KEYS = {"low", "high", "log", "step"}


def _fix_hint(key: str) -> str:
    return f"Fix the entry `{key}` of the search space."


@dataclass(frozen=True)
class Param:
    """One searched config key: a numeric range (``low``/``high``/``log``/``step``) or ``choices``."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    is_int: bool = False
    choices: tuple[Any, ...] | None = None

    @property
    def categorical(self) -> bool:
        return self.choices is not None

    @classmethod
    def from_spec(cls, key: str, spec: Any) -> Param:
        """Parse and validate one YAML entry; raises ``ValueError`` naming the key and the fix."""
        if not isinstance(spec, Mapping):
            raise ValueError(
                f"Search space entry `{key}` must be a mapping {{low, high[, log, step]}} or"
                f" {{choices: [...]}}, got {spec!r}. {_fix_hint(key)}"
            )
        if "choices" in spec:
            extra = set(spec) - {"choices"}
            choices = spec["choices"]
            if extra:
                raise ValueError(
                    f"Search space entry `{key}` mixes `choices` with {sorted(extra)}. {_fix_hint(key)}"
                )
            if not isinstance(choices, Sequence) or isinstance(choices, str) or len(choices) == 0:
                raise ValueError(
                    f"Search space entry `{key}` has an empty or invalid choice list {choices!r};"
                    f" give at least one value, e.g. `choices: [a, b]`."
                )
            return cls(key=key, choices=tuple(choices))
        unknown = set(spec) - _RANGE_KEYS
        missing = {"low", "high"} - set(spec)
        if unknown or missing:
            raise ValueError(
                f"Search space entry `{key}` needs `low` and `high` (optional `log`, `step`) or `choices`;"
                f" missing {sorted(missing)}, unknown {sorted(unknown)}. {_fix_hint(key)}"
            )
        low, high, log, step = spec["low"], spec["high"], bool(spec.get("log", False)), spec.get("step")
        for name, value in (("low", low), ("high", high), ("step", step)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise ValueError(f"Search space entry `{key}`: `{name}` must be a number, got {value!r}.")
        if low > high:
            raise ValueError(
                f"Search space entry `{key}`: low={low} > high={high}; swap the bounds so that low <= high."
            )
        if log and low <= 0:
            raise ValueError(
                f"Search space entry `{key}`: a log range needs low > 0, got low={low}; use a positive lower"
                f" bound (e.g. {high / 1000:g}) or `log: false`."
            )
        if step is not None and step <= 0:
            raise ValueError(f"Search space entry `{key}`: step must be > 0, got {step}.")
        if log and step is not None:
            raise ValueError(f"Search space entry `{key}`: `step` cannot be combined with `log: true`.")
        is_int = all(isinstance(v, int) for v in (low, high) + (() if step is None else (step,)))
        return cls(key=key, low=low, high=high, log=log, step=step, is_int=is_int)

    def distribution(self) -> BaseDistribution:
        """The Optuna distribution of this parameter."""
        if self.categorical:
            return CategoricalDistribution(list(self.choices))
        if self.is_int:
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=int(self.step or 1))
        return FloatDistribution(float(self.low), float(self.high), log=self.log, step=self.step)

    def probe_values(self) -> list[Any]:
        """Values that stand for the whole parameter when checking it against the recipe's types."""
        if self.categorical:
            return list(self.choices)
        if self.is_int:
            return [int(self.low), int(self.high)]
        return [float(self.low), float(self.high), float(self.low + self.high) / 2.0]

    def narrow(self, values: Sequence[Any], margin: float) -> Param:
        """The fine-stage version around ``values`` (best trials first); see the module docstring."""
        if self.categorical:
            kept = tuple(c for c in self.choices if c in values)
            return replace(self, choices=kept)
        to_u = math.log10 if self.log else float
        from_u = (lambda u: 10.0**u) if self.log else float
        lo_u, hi_u = to_u(self.low), to_u(self.high)
        vals = [to_u(v) for v in values]
        pad = margin * (hi_u - lo_u)
        new_lo = max(self.low, from_u(min(vals) - pad))
        new_hi = min(self.high, from_u(max(vals) + pad))
        # Guard against rounding at the edges of the coarse range and around the best value.
        new_lo, new_hi = max(self.low, min(new_lo, *values)), min(self.high, max(new_hi, *values))
        if self.is_int:
            step = int(self.step or 1)
            base = int(self.low)
            new_lo = base + math.floor((new_lo - base) / step) * step
            new_hi = base + math.ceil((new_hi - base) / step) * step
            new_hi = min(int(self.high), new_hi)
            if (new_hi - new_lo) % step:
                new_hi = new_lo + ((new_hi - new_lo) // step) * step
            return replace(self, low=int(new_lo), high=int(new_hi))
        if self.step is not None:
            return self  # a stepped float grid keeps its range: narrowing would break the grid
        return replace(self, low=float(new_lo), high=float(new_hi))

    def as_dict(self) -> dict[str, Any]:
        if self.categorical:
            return {"choices": list(self.choices)}
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out


@dataclass(frozen=True)
class SearchSpace:
    """An ordered set of :class:`Param` keyed by dotted config key."""

    params: tuple[Param, ...]

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> SearchSpace:
        if not isinstance(spec, Mapping) or not spec:
            raise ValueError(
                f"The search space must be a non-empty mapping of dotted config keys, got {spec!r}."
            )
        return cls(tuple(Param.from_spec(str(key), value) for key, value in spec.items()))

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.params]

    def distributions(self) -> dict[str, BaseDistribution]:
        return {p.key: p.distribution() for p in self.params}

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Sample every parameter through ``trial`` (Optuna's sampler decides the values)."""
        return {key: _suggest(trial, key, dist) for key, dist in self.distributions().items()}

    def narrow(self, best_first: Sequence[Mapping[str, Any]], margin: float = 0.1) -> SearchSpace:
        """Fine-stage space around the given trial parameters (best trial first)."""
        if not best_first:
            raise ValueError("Cannot narrow the search space: the coarse stage has no completed trial.")
        if not 0.0 <= margin <= 1.0:
            raise ValueError(f"margin must be in [0, 1], got {margin}")
        return SearchSpace(tuple(p.narrow([t[p.key] for t in best_first], margin) for p in self.params))

    def as_dict(self) -> dict[str, Any]:
        return {p.key: p.as_dict() for p in self.params}


def _suggest(trial: optuna.Trial, key: str, dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(key, dist.choices)
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
    return trial.suggest_float(key, dist.low, dist.high, step=dist.step, log=dist.log)
