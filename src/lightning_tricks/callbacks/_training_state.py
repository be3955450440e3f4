"""Exact capture and restore of everything a trial run before training can touch.

Parameters and buffers are copied back in place (``Tensor.copy_``) so optimizers and schedulers keep
pointing at the same tensors; optimizer state and param-group dicts are restored in place for the
same reason. :func:`preserved_training_state` adds every RNG stream (Python, NumPy, torch CPU and CUDA).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch import nn
from torch.utils.data import DataLoader

from lightning_tricks._lightning_compat import optimizer_step_flag, set_optimizer_step_flag


class ModuleSnapshot:
    """Bit-exact copy of a module's parameters, buffers, gradients and per-submodule training flags.

    Buffers are taken from ``named_buffers()`` so non-persistent ones (absent from ``state_dict``) are
    covered too. :meth:`restore` copies the values back by name into the module's current tensors, so
    optimizers, schedulers and anything else holding references to them keep working, and a buffer
    reassigned in the meantime gets its old value back as well.

    Example::

        snapshot = ModuleSnapshot(model)
        try:
            probe(model)
        finally:
            snapshot.restore()
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.params = {n: p.detach().clone() for n, p in module.named_parameters(remove_duplicate=False)}
        self.grads = {
            n: None if p.grad is None else p.grad.detach().clone()
            for n, p in module.named_parameters(remove_duplicate=False)
        }
        self.buffers = {n: b.detach().clone() for n, b in module.named_buffers(remove_duplicate=False)}
        self.training = {n: m.training for n, m in module.named_modules(remove_duplicate=False)}

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the captured values back into the module."""
        for name, param in self.module.named_parameters(remove_duplicate=False):
            param.copy_(self.params[name])
            saved = self.grads[name]
            param.grad = None if saved is None else saved.clone()
        for name, buf in self.module.named_buffers(remove_duplicate=False):
            if name in self.buffers:
                buf.copy_(self.buffers[name])
        for name, mod in self.module.named_modules(remove_duplicate=False):
            if name in self.training:
                mod.training = self.training[name]


class OptimizerSnapshot:
    """Copy of an optimizer's per-parameter state, param-group hyperparameters and step flag.

    Restored in place (same ``param_groups`` dicts, same ``state`` mapping), unlike
    ``Optimizer.load_state_dict`` which swaps in new dicts and casts tensors; schedulers and
    ``LightningOptimizer`` wrappers that hold references therefore see the original objects. The step
    flag is the one schedulers check to warn about ``scheduler.step()`` before ``optimizer.step()``.

    Example::

        snapshot = OptimizerSnapshot(optimizer)
        try:
            optimizer.step()
        finally:
            snapshot.restore()
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer
        self.state = {p: copy.deepcopy(s) for p, s in optimizer.state.items()}
        self.groups = [
            {k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups
        ]
        self.step_flag = optimizer_step_flag(optimizer)

    def restore(self) -> None:
        """Put the captured state and hyperparameters back into the same optimizer objects."""
        opt = self.optimizer
        opt.state.clear()
        opt.state.update(self.state)
        for group, saved in zip(opt.param_groups, self.groups, strict=True):
            for key in [k for k in group if k != "params" and k not in saved]:
                del group[key]
            group.update(saved)
        set_optimizer_step_flag(opt, self.step_flag)


def _loader_generators(iterables: Any) -> list[torch.Generator]:
    """Every ``torch.Generator`` a train DataLoader draws its order from (loader, sampler, batch sampler)."""
    found: list[torch.Generator] = []

    def visit(loader: Any) -> None:
        if not isinstance(loader, DataLoader):
            return
        candidates = [
            loader.generator,
            getattr(loader.sampler, "generator", None),
            getattr(getattr(loader.batch_sampler, "sampler", None), "generator", None),
        ]
        for gen in candidates:
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                found.append(gen)

    apply_to_collection(iterables, DataLoader, visit)
    return found


class TrainingStateSnapshot:
    """Bit-exact copy of model, optimizers, schedulers, grad scaler and data-order generators.

    Example::

        snapshot = TrainingStateSnapshot(trainer, pl_module)
        try:
            ...  # trial optimisation steps
        finally:
            snapshot.restore()
    """

    def __init__(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._module = ModuleSnapshot(pl_module)
        self._optimizers = [OptimizerSnapshot(opt) for opt in trainer.optimizers]
        self._schedulers = [
            (cfg.scheduler, copy.deepcopy(cfg.scheduler.state_dict())) for cfg in trainer.lr_scheduler_configs
        ]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler = (scaler, copy.deepcopy(scaler.state_dict())) if scaler is not None else None
        self._generators = [(g, g.get_state()) for g in _loader_generators(trainer.train_dataloader)]

    def restore(self) -> None:
        """Put every captured object back exactly as it was, reusing the original tensor objects."""
        self._module.restore()
        for optimizer in self._optimizers:
            optimizer.restore()
        for scheduler, state in self._schedulers:
            scheduler.load_state_dict(state)
        if self._scaler is not None:
            self._scaler[0].load_state_dict(self._scaler[1])
        for gen, state in self._generators:
            gen.set_state(state)


def rng_states() -> dict[str, Any]:
    """Every global RNG state: Python, NumPy, torch CPU and each CUDA device.

    Own helper: Lightning's ``isolate_rng`` is the public way but does not restore on error.

    Example:

        >>> states = rng_states()
        >>> first = torch.rand(1)
        >>> set_rng_states(states)
        >>> bool(torch.rand(1) == first)  # the same draw again
        True
    """
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore what :func:`rng_states` captured."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if states["cuda"]:
        torch.cuda.set_rng_state_all(states["cuda"])


@contextmanager
def preserved_training_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterator[None]:
    """Run the body, then restore the training state and every RNG stream exactly, even on error.

    Example::

        with preserved_training_state(trainer, pl_module):
            optimizer.step()  # trial step, undone on exit
    """
    # Like `isolate_rng`, but that one leaves the streams advanced when the body raises.
    saved_rng = rng_states()
    snapshot = TrainingStateSnapshot(trainer, pl_module)
    try:
        yield
    finally:
        snapshot.restore()
        set_rng_states(saved_rng)
