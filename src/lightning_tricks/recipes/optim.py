"""Optimizers: configuration, weight-decay parameter groups, the linear scaling rule and delta-bar-delta.

Two kinds of weight decay meet here and are easy to confuse:

* ``weight_decay`` of SGD, Adagrad, Adadelta, RMSprop and Adam is *coupled*: ``wd * w`` is added to the
  gradient before the update rule, so for adaptive methods it is divided by the per-weight step size
  normaliser like any other gradient term (it equals an L2 penalty ``wd/2 * ||w||^2`` in the loss).
* ``weight_decay`` of AdamW is *decoupled* (Loshchilov & Hutter, 2019): the weights are shrunk directly,
  ``w -= lr * wd * w``, outside the adaptive normalisation. With plain SGD the two coincide.

Example::

    from lightning_tricks.recipes.optim import OptimizerConfig, build_optimizer

    config = OptimizerConfig(name="sgd", lr=0.1, weight_decay=5e-4, base_batch_size=256)
    optimizer = build_optimizer(model, config, global_batch_size=512)  # lr 0.2
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

from lightning_tricks._extras import import_optional
from lightning_tricks.recipes._validation import check_optimizer_kwargs, check_wrapper_settings
from lightning_tricks.recipes.models.layers import NORM_LAYER_TYPES
from lightning_tricks.recipes.optim_wrappers import lookahead

OPTIMIZER_NAMES: tuple[str, ...] = (
    "sgd",
    "adagrad",
    "adadelta",
    "rmsprop",
    "adam",
    "adamw",
    "delta_bar_delta",
    "lars",
    "lamb",
)
#: Optimizers that come from ``timm.optim`` (the ``timm`` extra), imported only when chosen.
TIMM_OPTIMIZERS: dict[str, str] = {"lars": "Lars", "lamb": "Lamb"}

#: Each optimizer's own defaults for the config fields left at ``None``: torch's defaults, except SGD's
#: lr 0.1 with momentum 0.9 (the CNN recipes), Adadelta's lr 1.0 (Zeiler 2012: the update
#: ``-sqrt(E[dx^2] + eps) / sqrt(E[g^2] + eps) * g`` is used as is, without a global learning rate) and
#: no momentum for RMSprop and delta-bar-delta (the methods as the lectures state them). LARS (You et al.
#: 2017) has timm's lr 1.0 with the paper's momentum 0.9 (its trust coefficient 0.001 scales each layer's
#: step to ``0.001 * ||w|| / ||g + wd w||``); LAMB (You et al. 2020) the paper's lr 1e-3 and eps 1e-6.
OPTIMIZER_DEFAULTS: dict[str, dict[str, float]] = {
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "adagrad": {"lr": 0.01, "eps": 1e-10},
    "adadelta": {"lr": 1.0, "eps": 1e-6},
    "rmsprop": {"lr": 0.01, "momentum": 0.0, "eps": 1e-8},
    "adam": {"lr": 1e-3, "eps": 1e-8},
    "adamw": {"lr": 1e-3, "eps": 1e-8},
    "delta_bar_delta": {"lr": 0.01, "momentum": 0.0},
    "lars": {"lr": 1.0, "momentum": 0.9, "eps": 1e-8},
    "lamb": {"lr": 1e-3, "eps": 1e-6},
}
#: Adadelta's decay of its running averages in Zeiler (2012) (torch's default is 0.9).
ADADELTA_RHO = 0.95


#: Parameter kinds that ``OptimizerConfig.lr_multipliers`` can give their own learning rate, in
#: matching priority.
LR_MULTIPLIER_KINDS: tuple[str, ...] = ("norm_bias", "norm", "bias")

#: Defaults of the optimizer wrappers: Lookahead as in Zhang et al. (2019)'s experiments, SAM's radius of
#: Foret et al. (2021).
LOOKAHEAD_DEFAULTS: dict[str, Any] = {"k": 5, "alpha": 0.5}
SAM_DEFAULTS: dict[str, Any] = {"rho": 0.05, "adaptive": False}


@dataclass(frozen=True)
class OptimizerConfig:
    """Which optimizer to build and with which hyper-parameters.

    Args:
        name: One of ``sgd | adagrad | adadelta | rmsprop | adam | adamw | delta_bar_delta | lars | lamb``
            (``lars``/``lamb`` are ``timm.optim``'s, from the ``timm`` extra). LARS and LAMB adapt the step
            of the weights layer by layer (trust ratio); like weight decay, normalization parameters and
            biases are left out of it when ``exclude_norm_and_bias_from_decay`` (their convention).
        lr: Base learning rate (before the linear scaling rule); ``None`` for the optimizer's own default
            (:data:`OPTIMIZER_DEFAULTS`: sgd 0.1, adagrad/rmsprop/delta_bar_delta 0.01, adadelta 1.0,
            adam/adamw 1e-3).
        weight_decay: ``torch.optim``'s own weight decay: coupled (added to the gradient) for every
            optimizer except ``adamw``, where it is decoupled (weights shrunk directly).
        momentum: Momentum of ``sgd``, ``rmsprop``, ``delta_bar_delta`` and ``lars``; ``None`` for the
            default (0.9 for sgd and lars, 0 for the others). Other optimizers reject a non-zero value
            (Adam's is ``betas[0]``).
        nesterov: Nesterov momentum for ``sgd`` and ``lars``.
        betas: ``(beta1, beta2)`` of ``adam``/``adamw``/``lamb``.
        eps: Denominator epsilon of the adaptive methods; ``None`` for the optimizer's default (torch's:
            adagrad 1e-10, adadelta 1e-6, the others 1e-8). Rejected by ``sgd`` and ``delta_bar_delta``.
        exclude_norm_and_bias_from_decay: Put normalization-layer parameters and biases in a group
            with ``weight_decay=0``.
        base_batch_size: Batch size ``lr`` was tuned for; with it the linear scaling rule
            ``lr * global_batch_size / base_batch_size`` is applied (Goyal et al., 2017).
        kwargs: Extra keyword arguments for the optimizer class; they override the fields above.
        lr_multipliers: Per-parameter-kind learning-rate factors, each kind in its own param group:
            ``norm_bias`` (biases of normalization layers), ``norm`` (all normalization parameters),
            ``bias`` (every parameter named ``bias``). The first matching kind in
            :data:`LR_MULTIPLIER_KINDS` order wins. Schedules scale each group's lr, so the ratio holds
            throughout; weight decay coefficients are unchanged. Example (airbench): ``{norm_bias: 64}``.
        lookahead: Wrap the optimizer in timm's Lookahead: ``{k: 5, alpha: 0.5}`` (missing keys take these
            defaults; ``k`` an integer >= 1, ``alpha`` in (0, 1]); ``None`` for none.
        sam: Wrap the optimizer in SAM (:class:`~lightning_tricks.recipes.sam.SAM`): ``{rho: 0.05,
            adaptive: false}`` (``adaptive: true`` is ASAM); ``None`` for none. Each step then costs two
            forward/backward passes. With both, Lookahead wraps SAM.
        layer_decay: Discriminative (layer-wise decayed) learning rates, as timm's ``layer_decay`` and
            fastai's ``slice(lo, hi)``: a parameter ``depth`` layers below the classifier gets
            ``lr * layer_decay**depth`` (layers as :mod:`~lightning_tricks.recipes.layer_groups` defines
            them); ``None`` (default) gives every layer ``lr``. In ``(0, 1]``, e.g. 0.7. It multiplies
            ``lr_multipliers`` and the linear scaling rule, and schedules scale each group's lr.

    Example::

        OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.05)
    """

    name: str = "sgd"
    lr: float | None = None
    weight_decay: float = 0.0
    momentum: float | None = None
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float | None = None
    exclude_norm_and_bias_from_decay: bool = True
    base_batch_size: int | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    lookahead: dict[str, Any] | None = None
    sam: dict[str, Any] | None = None
    layer_decay: float | None = None

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZER_NAMES:
            raise ValueError(
                f"optimizer.name={self.name!r} is unknown; valid names: {', '.join(OPTIMIZER_NAMES)}"
            )
        self._resolve_defaults()
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"optimizer.lr must be a positive number, got {self.lr}; e.g. optimizer.lr=0.1")
        if not self.weight_decay >= 0:
            raise ValueError(
                f"optimizer.weight_decay must be >= 0, got {self.weight_decay}; use 0 to disable it"
            )
        if self.momentum is not None and not 0 <= self.momentum < 1:
            raise ValueError(f"optimizer.momentum must be in [0, 1), got {self.momentum}; e.g. 0.9")
        if self.nesterov and (self.name not in ("sgd", "lars") or not self.momentum):
            raise ValueError(
                "optimizer.nesterov=True needs optimizer.name='sgd' or 'lars' and optimizer.momentum > 0"
            )
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optimizer.betas must be two numbers in [0, 1), got {self.betas}")
        if self.eps is not None and not self.eps > 0:
            raise ValueError(f"optimizer.eps must be > 0, got {self.eps}; e.g. 1e-8")
        if self.base_batch_size is not None and self.base_batch_size < 1:
            raise ValueError(
                f"optimizer.base_batch_size must be >= 1 or None, got {self.base_batch_size}; "
                "set it to the batch size the lr was tuned for, or None to disable the scaling rule"
            )
        check_optimizer_kwargs(self.name, self.kwargs, optimizer_arguments(self.name))
        for kind, factor in self.lr_multipliers.items():
            if kind not in LR_MULTIPLIER_KINDS:
                raise ValueError(
                    f"optimizer.lr_multipliers has unknown kind {kind!r}; "
                    f"valid kinds: {', '.join(LR_MULTIPLIER_KINDS)}"
                )
            if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
                raise ValueError(
                    f"optimizer.lr_multipliers.{kind} must be a positive number, got {factor!r}; e.g. 64"
                )
        if self.layer_decay is not None and not (
            isinstance(self.layer_decay, (int, float)) and 0 < self.layer_decay <= 1
        ):
            raise ValueError(
                f"optimizer.layer_decay must be in (0, 1] or null, got {self.layer_decay!r}; "
                "e.g. 0.7 (each layer below the head trains at 0.7x the lr of the layer above)"
            )
        self._reject_foreign_options()
        object.__setattr__(
            self, "lookahead", _wrapper_settings("lookahead", self.lookahead, LOOKAHEAD_DEFAULTS)
        )
        object.__setattr__(self, "sam", _wrapper_settings("sam", self.sam, SAM_DEFAULTS))

    def _resolve_defaults(self) -> None:
        """Fill ``lr``/``momentum``/``eps`` left at ``None`` from :data:`OPTIMIZER_DEFAULTS`."""
        defaults = OPTIMIZER_DEFAULTS[self.name]
        for key in ("lr", "momentum", "eps"):
            if getattr(self, key) is None and key in defaults:
                object.__setattr__(self, key, defaults[key])  # frozen: set once, while constructing

    def _reject_foreign_options(self) -> None:
        """Reject momentum/eps the optimizer does not have (a silently ignored momentum is a different
        experiment)."""
        defaults = OPTIMIZER_DEFAULTS[self.name]
        for key in ("momentum", "eps"):
            value = getattr(self, key)
            if value and key not in defaults:
                users = [n for n, d in OPTIMIZER_DEFAULTS.items() if key in d]
                raise ValueError(
                    f"optimizer.{key}={value} does not apply to optimizer.name={self.name!r}; it is used by "
                    f"{', '.join(users)}. Remove it (or set null)"
                )


def _wrapper_settings(
    key: str, given: dict[str, Any] | None, defaults: dict[str, Any]
) -> dict[str, Any] | None:
    """``given`` completed with ``defaults``, checked; ``None`` stays ``None`` (no wrapper)."""
    if given is None:
        return None
    if not isinstance(given, dict):
        raise ValueError(
            f"optimizer.{key} must be a mapping like {defaults} or null, got {given!r}; "
            f"e.g. optimizer.{key}={{}} for the defaults"
        )
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError(f"optimizer.{key} has unknown keys {unknown}; valid: {sorted(defaults)}")
    settings = {**defaults, **given}
    check_wrapper_settings(key, settings)
    return settings


def split_decay_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split the trainable parameters of ``model`` into ``(decay, no_decay)``.

    ``no_decay`` holds exactly the parameters of normalization layers
    (:data:`~lightning_tricks.recipes.models.layers.NORM_LAYER_TYPES`) and every parameter registered
    under the name ``bias``; ``decay`` holds the rest. Parameters with ``requires_grad=False`` are
    skipped and shared parameters appear once.

    Example::

        decay, no_decay = split_decay_parameters(model)
    """
    no_decay_ids: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, NORM_LAYER_TYPES) or name == "bias":
                no_decay_ids.add(id(param))
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if id(param) in no_decay_ids else decay).append(param)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float, exclude_norm_and_bias: bool = True) -> list[dict]:
    """Optimizer parameter groups with weight decay on weights only.

    Args:
        model: The model whose trainable parameters are grouped.
        weight_decay: Decay of the ``decay`` group.
        exclude_norm_and_bias: If ``False``, a single group with ``weight_decay`` for every parameter.

    Returns:
        ``[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]``
        with empty groups omitted.

    Example::

        torch.optim.SGD(param_groups(model, 5e-4), lr=0.1, momentum=0.9)
    """
    if not exclude_norm_and_bias:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params, "weight_decay": weight_decay}] if params else []
    decay, no_decay = split_decay_parameters(model)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def scaled_lr(lr: float, base_batch_size: int | None, global_batch_size: int | None) -> float:
    """Linear scaling rule: ``lr * global_batch_size / base_batch_size``; ``lr`` if either is ``None``.

    Example::

        scaled_lr(0.1, 256, 1024)  # 0.4
    """
    if base_batch_size is None or global_batch_size is None:
        return lr
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
    return lr * global_batch_size / base_batch_size


def build_optimizer(
    model: nn.Module, config: OptimizerConfig, global_batch_size: int | None = None
) -> torch.optim.Optimizer:
    """Build the optimizer described by ``config`` for the trainable parameters of ``model``.

    Args:
        model: Model to optimise.
        config: Optimizer configuration.
        global_batch_size: Samples per optimizer step over the whole run
            (per-device batch x devices x nodes x gradient accumulation). Used with
            ``config.base_batch_size`` for the linear scaling rule; ignored if either is ``None``.

    Returns:
        A ``torch.optim`` optimizer (or :class:`DeltaBarDelta`, or timm's ``Lars``/``Lamb``), wrapped in
        :class:`~lightning_tricks.recipes.sam.SAM` and then timm's ``Lookahead`` when configured.

    Example::

        optimizer = build_optimizer(model, OptimizerConfig(name="adam", lr=1e-3))
    """
    lr = scaled_lr(config.lr, config.base_batch_size, global_batch_size)
    groups = build_param_groups(model, config, lr)
    if not groups:
        raise ValueError("the model has no trainable parameters (all have requires_grad=False)")
    wd = config.weight_decay
    if config.name in TIMM_OPTIMIZERS:
        groups = _mark_layer_adaptation(model, groups, config)
    factories: dict[str, tuple[Callable[..., torch.optim.Optimizer], dict[str, Any]]] = {
        "sgd": (
            torch.optim.SGD,
            {"momentum": config.momentum, "nesterov": config.nesterov, "weight_decay": wd},
        ),
        "adagrad": (torch.optim.Adagrad, {"eps": config.eps, "weight_decay": wd}),
        "adadelta": (torch.optim.Adadelta, {"eps": config.eps, "rho": ADADELTA_RHO, "weight_decay": wd}),
        "rmsprop": (
            torch.optim.RMSprop,
            {"momentum": config.momentum, "eps": config.eps, "weight_decay": wd},
        ),
        "adam": (torch.optim.Adam, {"betas": config.betas, "eps": config.eps, "weight_decay": wd}),
        "adamw": (torch.optim.AdamW, {"betas": config.betas, "eps": config.eps, "weight_decay": wd}),
        "delta_bar_delta": (DeltaBarDelta, {"momentum": config.momentum, "weight_decay": wd}),
        # LAMB as in the paper: no global gradient-norm clipping before the update (timm's default
        # max_grad_norm=1.0 is NVIDIA's BERT variant); clip with trainer.gradient_clip_val instead.
        "lamb": (
            partial(_build_timm_optimizer, "lamb"),
            {"betas": config.betas, "eps": config.eps, "weight_decay": wd, "max_grad_norm": None},
        ),
        "lars": (
            partial(_build_timm_optimizer, "lars"),
            {"momentum": config.momentum, "nesterov": config.nesterov, "eps": config.eps, "weight_decay": wd},
        ),
    }
    cls, defaults = factories[config.name]
    optimizer = cls(groups, lr=lr, **{**defaults, **config.kwargs})
    return wrap_optimizer(optimizer, config)


def build_param_groups(model: nn.Module, config: OptimizerConfig, lr: float) -> list[dict[str, Any]]:
    """The param groups :func:`build_optimizer` gives the trainable parameters of ``model`` at base rate
    ``lr``: the weight-decay split, then ``lr_multipliers``, then ``layer_decay``; groups without an ``lr``
    use ``lr``.

    Example::

        groups = build_param_groups(model, OptimizerConfig(layer_decay=0.7), lr=0.1)
    """
    groups = param_groups(model, config.weight_decay, config.exclude_norm_and_bias_from_decay)
    if config.lr_multipliers:
        groups = apply_lr_multipliers(model, groups, lr, config.lr_multipliers)
    if config.layer_decay is not None:
        groups = apply_layer_decay(model, groups, lr, config.layer_decay)
    return groups


def apply_layer_decay(
    model: nn.Module, groups: list[dict[str, Any]], lr: float, decay: float
) -> list[dict[str, Any]]:
    """Split ``groups`` by layer depth (:func:`~lightning_tricks.recipes.layer_groups.layer_depths`), each
    part with ``group_lr * decay**depth`` (``group_lr``: the group's own lr, else ``lr``) and ``layer_depth``.

    Example::

        groups = apply_layer_decay(model, param_groups(model, 5e-4), lr=0.1, decay=0.7)
    """
    from lightning_tricks.recipes.layer_groups import layer_depths

    depths = layer_depths(model)
    depth_of = {id(p): depths[name] for name, p in model.named_parameters()}
    result: list[dict[str, Any]] = []
    for group in groups:
        by_depth: dict[int, list[nn.Parameter]] = {}
        for param in group["params"]:
            by_depth.setdefault(depth_of[id(param)], []).append(param)
        base = group.get("lr", lr)
        for depth in sorted(by_depth, reverse=True):
            result.append(
                {**group, "params": by_depth[depth], "lr": base * decay**depth, "layer_depth": depth}
            )
    return result


def wrap_optimizer(optimizer: torch.optim.Optimizer, config: OptimizerConfig) -> torch.optim.Optimizer:
    """``optimizer`` inside the wrappers ``config`` asks for: SAM first, then Lookahead around it.

    Example::

        wrap_optimizer(sgd, OptimizerConfig(lookahead={"k": 5, "alpha": 0.5}))  # Lookahead(SGD)
    """
    if config.sam is not None:
        from lightning_tricks.recipes.sam import SAM

        optimizer = SAM(optimizer, **config.sam)
    if config.lookahead is not None:
        optimizer = lookahead(optimizer, **config.lookahead)
    return optimizer


def _timm_optimizer(name: str) -> type[torch.optim.Optimizer]:
    """timm's class for ``name`` (``lars``/``lamb``), imported only when chosen."""
    timm_optim = import_optional("timm.optim", f"optimizer.name={name!r}")
    return getattr(timm_optim, TIMM_OPTIMIZERS[name])


def _build_timm_optimizer(name: str, params: Any, **kwargs: Any) -> torch.optim.Optimizer:
    return _timm_optimizer(name)(params, **kwargs)


def _mark_layer_adaptation(
    model: nn.Module, groups: list[dict[str, Any]], config: OptimizerConfig
) -> list[dict[str, Any]]:
    """Trust-ratio adaptation on the weights, not on normalization parameters and biases.

    timm's LARS/LAMB adapt a group only when its weight decay is non-zero (or ``always_adapt``), which
    would silently turn LAMB into Adam and LARS into SGD at ``weight_decay=0``; a per-group
    ``always_adapt`` ties the adaptation to the parameter kind instead (the no-decay group of
    :func:`param_groups` when ``exclude_norm_and_bias_from_decay``). ``kwargs.always_adapt`` overrides.
    """
    if "always_adapt" in config.kwargs:
        return groups
    no_decay = {id(p) for p in split_decay_parameters(model)[1]}
    return [
        dict(
            group,
            always_adapt=not (
                config.exclude_norm_and_bias_from_decay and all(id(p) in no_decay for p in group["params"])
            ),
        )
        for group in groups
    ]


def parameter_kinds(model: nn.Module) -> dict[int, set[str]]:
    """``id(param) -> kinds`` of :data:`LR_MULTIPLIER_KINDS` that each parameter of ``model`` belongs to."""
    kinds: dict[int, set[str]] = {}
    for module in model.modules():
        norm = isinstance(module, NORM_LAYER_TYPES)
        for name, param in module.named_parameters(recurse=False):
            found = kinds.setdefault(id(param), set())
            if norm:
                found.add("norm")
            if name == "bias":
                found.add("bias")
            if norm and name == "bias":
                found.add("norm_bias")
    return kinds


def apply_lr_multipliers(
    model: nn.Module, groups: list[dict[str, Any]], lr: float, multipliers: dict[str, float]
) -> list[dict[str, Any]]:
    """Split ``groups`` so each parameter kind in ``multipliers`` has its own group with
    ``lr * factor`` (other group settings kept); empty groups are dropped.

    Example::

        groups = apply_lr_multipliers(model, param_groups(model, 5e-4), 0.1, {"norm_bias": 64})
    """
    kinds = parameter_kinds(model)
    ordered = [kind for kind in LR_MULTIPLIER_KINDS if kind in multipliers]
    result: list[dict[str, Any]] = []
    for group in groups:
        buckets: dict[str | None, list[nn.Parameter]] = {kind: [] for kind in [None, *ordered]}
        for param in group["params"]:
            owned = kinds.get(id(param), set())
            buckets[next((kind for kind in ordered if kind in owned), None)].append(param)
        for kind, params in buckets.items():
            if not params:
                continue
            extra = {} if kind is None else {"lr": lr * multipliers[kind], "lr_multiplier_kind": kind}
            result.append({**group, "params": params, **extra})
    return result


class DeltaBarDelta(torch.optim.Optimizer):
    """Gradient descent with adaptive per-weight gains (Jacobs, 1988; Hinton's Coursera lecture 6d).

    Each weight has a gain ``g`` starting at 1. When the gradient keeps its sign from one step to the
    next the gain grows additively, ``g += increase``; when it flips the gain shrinks multiplicatively,
    ``g *= decrease``; a zero in either gradient leaves it unchanged. Gains are clipped to
    ``[min_gain, max_gain]`` and the update is ``w -= lr * v`` with ``v = momentum * v + g * grad``.
    Hand-written because ``torch.optim`` has no per-weight-gain method (Rprop uses only gradient signs).

    Args:
        params: Parameters or parameter groups.
        lr: Global learning rate.
        increase: Additive gain increase on sign agreement.
        decrease: Multiplicative gain decrease on a sign flip, in ``(0, 1]``.
        min_gain: Lower clip of the gains.
        max_gain: Upper clip of the gains.
        momentum: Momentum of the gain-scaled update, in ``[0, 1)``.
        weight_decay: Coupled L2 weight decay: ``wd * w`` is added to the gradient before anything else.

    Example::

        optimizer = DeltaBarDelta(model.parameters(), lr=0.01, momentum=0.9)
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter] | Iterable[dict[str, Any]],
        lr: float = 0.01,
        increase: float = 0.05,
        decrease: float = 0.95,
        min_gain: float = 0.01,
        max_gain: float = 100.0,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"DeltaBarDelta lr must be > 0, got {lr}")
        if not increase >= 0:
            raise ValueError(f"DeltaBarDelta increase must be >= 0, got {increase}")
        if not 0 < decrease <= 1:
            raise ValueError(f"DeltaBarDelta decrease must be in (0, 1], got {decrease}")
        if not 0 < min_gain <= 1 <= max_gain:
            raise ValueError(
                "DeltaBarDelta needs 0 < min_gain <= 1 <= max_gain, "
                f"got min_gain={min_gain}, max_gain={max_gain}"
            )
        if not 0 <= momentum < 1:
            raise ValueError(f"DeltaBarDelta momentum must be in [0, 1), got {momentum}")
        if not weight_decay >= 0:
            raise ValueError(f"DeltaBarDelta weight_decay must be >= 0, got {weight_decay}")
        defaults = {
            "lr": lr,
            "increase": increase,
            "decrease": decrease,
            "min_gain": min_gain,
            "max_gain": max_gain,
            "momentum": momentum,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """Perform one update; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("DeltaBarDelta does not support sparse gradients")
                grad = p.grad
                if group["weight_decay"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["gain"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    state["prev_grad"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    if group["momentum"]:
                        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                gain = state["gain"]
                agreement = grad * state["prev_grad"]
                gain.copy_(
                    torch.where(
                        agreement > 0,
                        gain + group["increase"],
                        torch.where(agreement < 0, gain * group["decrease"], gain),
                    )
                ).clamp_(group["min_gain"], group["max_gain"])
                update = gain * grad
                if group["momentum"]:
                    buf = state.setdefault("momentum_buffer", torch.zeros_like(p))
                    update = buf.mul_(group["momentum"]).add_(update)
                p.add_(update, alpha=-group["lr"])
                state["prev_grad"].copy_(grad)
                state["step"] += 1
        return loss


# -- validation of optimizer.kwargs -------------------------------------------------------------------
def optimizer_arguments(name: str) -> list[str]:
    """Keyword arguments the optimizer class of ``name`` accepts (besides ``params``).

    Example::

        "nesterov" in optimizer_arguments("sgd")  # True
    """
    classes: dict[str, type[torch.optim.Optimizer]] = {
        "sgd": torch.optim.SGD,
        "adagrad": torch.optim.Adagrad,
        "adadelta": torch.optim.Adadelta,
        "rmsprop": torch.optim.RMSprop,
        "adam": torch.optim.Adam,
        "adamw": torch.optim.AdamW,
        "delta_bar_delta": DeltaBarDelta,
    }
    cls = _timm_optimizer(name) if name in TIMM_OPTIMIZERS else classes[name]
    return [p for p in inspect.signature(cls).parameters if p != "params"]
