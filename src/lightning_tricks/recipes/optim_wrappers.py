"""Optimizer wrappers (Lookahead, SAM): building them, seeing through them, rebuilding them around a new base.

A wrapper shares the param groups, the ``state`` and the ``state_dict`` of the optimizer it wraps, so
LR schedulers, warm-up, the linear scaling rule, checkpoints and callbacks that read or restore
``optimizer.state`` (LRFinder, SnapshotEnsemble, OptimizerSwitch) work on a wrapped optimizer as on
the plain one.

Example::

    optimizer = lookahead(torch.optim.SGD(model.parameters(), lr=0.1), k=5, alpha=0.5)
    innermost(optimizer)  # the SGD
"""

from __future__ import annotations

from typing import Any

import torch

from lightning_tricks._extras import import_optional


def share_state(wrapper: torch.optim.Optimizer, base: torch.optim.Optimizer) -> None:
    """Make ``wrapper.state`` the very dict of the innermost optimizer's ``state``, also after its
    ``load_state_dict`` (which replaces that dict), so code that reads, clears or restores
    ``wrapper.state`` reaches the real per-parameter state."""
    inner = innermost(base)
    wrapper.state = inner.state

    def follow(optimizer: torch.optim.Optimizer) -> None:
        wrapper.state = optimizer.state

    inner.register_load_state_dict_post_hook(follow)


def lookahead(base: torch.optim.Optimizer, k: int = 5, alpha: float = 0.5) -> torch.optim.Optimizer:
    """timm's ``Lookahead`` (Zhang et al. 2019) around ``base``: every ``k`` steps the slow weights move
    ``alpha`` of the way to the fast ones and the fast weights restart from them.

    The slow weights live in ``base``'s state (``lookahead_slow_buff``) and the step count in each param
    group (``lookahead_step``), so both are in the optimizer's ``state_dict`` and checkpoints. They start
    at the weights before the first step, as in the paper (see :func:`_slow_weights_from_the_start`).

    Example::

        optimizer = lookahead(torch.optim.Adam(model.parameters()), k=6, alpha=0.5)
    """
    timm_optim = import_optional("timm.optim", "optimizer.lookahead")
    wrapper = timm_optim.Lookahead(base, alpha=alpha, k=k)
    share_state(wrapper, base)
    _slow_weights_from_the_start(base)
    return wrapper


def _slow_weights_from_the_start(base: torch.optim.Optimizer) -> None:
    """Make the slow weights start at ``theta_0`` (the paper's ``phi_0 = theta_0``).

    timm creates them lazily at the first synchronisation from the fast weights of that moment, which
    skips the first interpolation. The weights are copied before a step and stored as slow weights
    after it, once ``base`` has created its own state (optimizers such as Adam initialise a parameter's
    state only while it is empty), for parameters that have no slow weights yet and had a gradient.
    """
    initial: dict[torch.Tensor, torch.Tensor] = {}

    def before_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if "lookahead_slow_buff" not in optimizer.state.get(p, {}):
                    initial[p] = p.detach().clone()

    def after_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p, value in initial.items():
            if p.grad is not None:
                optimizer.state[p].setdefault("lookahead_slow_buff", value)
        initial.clear()

    base.register_step_pre_hook(before_step)
    base.register_step_post_hook(after_step)


def wrapped_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The optimizer directly inside ``optimizer`` (Lookahead, SAM, Lightning's ``LightningOptimizer``),
    or ``None`` for a plain one."""
    for attribute in ("_base_optimizer", "base_optimizer", "_optimizer"):
        inner = getattr(optimizer, attribute, None)
        if isinstance(inner, torch.optim.Optimizer) and inner is not optimizer:
            return inner
    return None


def innermost(optimizer: Any) -> torch.optim.Optimizer:
    """The optimizer that makes the update, inside any wrappers.

    Example::

        innermost(lookahead(torch.optim.SGD(params, lr=0.1)))  # the SGD
    """
    while (inner := wrapped_optimizer(optimizer)) is not None:
        optimizer = inner
    return optimizer


def find_wrapper(optimizer: Any, wrapper_type: type) -> Any:
    """The first optimizer of type ``wrapper_type`` in the chain starting at ``optimizer``, or ``None``."""
    while optimizer is not None:
        if isinstance(optimizer, wrapper_type):
            return optimizer
        optimizer = wrapped_optimizer(optimizer)
    return None


def rewrap(old: torch.optim.Optimizer, new_base: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Put ``new_base`` inside the same wrappers, with the same settings, as ``old``'s innermost optimizer.

    Used when a callback replaces the optimizer mid-run (OptimizerSwitch): a Lookahead then starts a new
    cycle from the current weights, a SAM keeps its radius.

    Example::

        sgd = rewrap(lookahead_adam, torch.optim.SGD(groups, lr=0.01))  # Lookahead(SGD)
    """
    from lightning_tricks.recipes.sam import SAM

    inner = wrapped_optimizer(old)
    if inner is None or not isinstance(old, torch.optim.Optimizer):
        return new_base
    rebuilt = rewrap(inner, new_base)
    if isinstance(old, SAM):
        return SAM(rebuilt, rho=old.defaults["sam_rho"], adaptive=old.defaults["sam_adaptive"])
    if "lookahead_k" in old.defaults:
        return lookahead(rebuilt, k=old.defaults["lookahead_k"], alpha=old.defaults["lookahead_alpha"])
    raise TypeError(f"cannot rebuild the optimizer wrapper {type(old).__name__} around a new optimizer")
