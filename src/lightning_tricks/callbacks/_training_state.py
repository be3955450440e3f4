"""Exact capture and restore of everything a trial run before training can touch.

Parameters and buffers are copied back in place (``Tensor.copy_``) so optimizers and schedulers keep
pointing at the same tensors; optimizer state and param-group dicts are restored in place for the
same reason. RNG streams are handled separately by ``lightning.pytorch.utilities.seed.isolate_rng``.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from torch.utils.data import DataLoader


def _clone(value: Any) -> Any:
    return apply_to_collection(copy.deepcopy(value), torch.Tensor, lambda t: t.detach().clone())


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
        self._tensors = [(t, t.detach().clone()) for t in [*pl_module.parameters(), *pl_module.buffers()]]
        self._grads = [
            (p, None if p.grad is None else p.grad.detach().clone()) for p in pl_module.parameters()
        ]
        self._modes = [(m, m.training) for m in pl_module.modules()]
        self._optimizers = [
            (
                opt,
                {p: _clone(s) for p, s in opt.state.items()},
                [{k: _clone(v) for k, v in g.items() if k != "params"} for g in opt.param_groups],
            )
            for opt in trainer.optimizers
        ]
        self._schedulers = [
            (cfg.scheduler, _clone(cfg.scheduler.state_dict())) for cfg in trainer.lr_scheduler_configs
        ]
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._scaler = (scaler, _clone(scaler.state_dict())) if scaler is not None else None
        self._generators = [(g, g.get_state()) for g in _loader_generators(trainer.train_dataloader)]

    def restore(self) -> None:
        """Put every captured object back exactly as it was, reusing the original tensor objects."""
        with torch.no_grad():
            for tensor, saved in self._tensors:
                tensor.copy_(saved)
        for param, grad in self._grads:
            param.grad = grad
        for module, mode in self._modes:
            module.training = mode
        for opt, state, groups in self._optimizers:
            opt.state.clear()
            opt.state.update(state)
            for group, saved in zip(opt.param_groups, groups, strict=True):
                for key in [k for k in group if k != "params" and k not in saved]:
                    del group[key]
                group.update(saved)
        for scheduler, state in self._schedulers:
            scheduler.load_state_dict(state)
        if self._scaler is not None:
            self._scaler[0].load_state_dict(self._scaler[1])
        for gen, state in self._generators:
            gen.set_state(state)
