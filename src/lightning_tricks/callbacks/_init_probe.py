"""The initialization probe of :class:`TrainingDiagnostics`: how the signal flows through the layers."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from lightning_tricks.callbacks._sanity import (
    classifier_forward,
    data_loss,
    draw_batches,
    regularization_off,
    split_batch,
)
from lightning_tricks.interface import expected_initial_loss

_PROBED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@torch.no_grad()
def probe_initialization(trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
    """Per-layer variance of Linear/Conv outputs and of their gradients on one training batch.

    Returns ``initial_loss``, ``num_classes`` and ``expected_loss`` (``[value, formula]``) (when the
    module looks like a classifier), ``layers`` /
    ``activation_var`` in forward order and ``gradient_layers`` / ``gradient_var`` in backward order,
    the output layer left out; ``{}`` when no training batch can be split into inputs and targets.
    Runs with regularization off and gradients accumulated into the module: the caller restores
    the training state around it (:func:`preserved_training_state`).

    Example::

        with preserved_training_state(trainer, pl_module):
            probe = probe_initialization(trainer, pl_module)
    """
    batches = draw_batches(trainer, num_batches=1)
    pair = split_batch(batches[0], pl_module) if batches else None
    if not isinstance(pair, tuple):
        return {}
    x, y = pair
    order: list[str] = []
    act_var: dict[str, float] = {}
    grad_var: dict[str, float] = {}

    def make_hook(name: str) -> Any:
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            if not isinstance(out, Tensor) or name in act_var:
                return
            order.append(name)
            act_var[name] = float(out.detach().float().var())
            if out.requires_grad:
                out.register_hook(grad_hook)

        def grad_hook(grad: Tensor) -> None:
            grad_var.setdefault(name, float(grad.float().var()))

        return hook

    handles = [
        m.register_forward_hook(make_hook(n))
        for n, m in pl_module.named_modules()
        if isinstance(m, _PROBED_LAYERS)
    ]
    result: dict[str, Any] = {}
    pl_module.train()
    try:
        with regularization_off(pl_module), torch.enable_grad():
            logits, reason = classifier_forward(trainer, pl_module, x, y)
            if reason is None:
                loss = data_loss(pl_module, logits, y)
                result["initial_loss"] = float(loss.detach())
                result["num_classes"] = int(logits.shape[1])
                result["expected_loss"] = list(expected_initial_loss(pl_module, result["num_classes"]))
                if loss.requires_grad:
                    loss.backward()
    finally:
        for handle in handles:
            handle.remove()
    # The output layer is left out: a deliberately small last layer is not a signal problem.
    hidden = order[:-1] if len(order) > 2 else order
    result["layers"] = hidden
    result["activation_var"] = [act_var[n] for n in hidden]
    grad_layers = [n for n in reversed(hidden) if n in grad_var]
    result["gradient_layers"] = grad_layers
    result["gradient_var"] = [grad_var[n] for n in grad_layers]
    return result
