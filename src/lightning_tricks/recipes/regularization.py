"""Loss-side regularisation: L1/L2 penalties and label smoothing, plus the model's dropout settings.

An L2 *penalty* ``l2/2 * ||w||^2`` added to the loss contributes ``l2 * w`` to the gradient, which then
goes through the optimizer's update rule (for Adam, through its per-weight normalisation, so large-gradient
weights are decayed less). *Decoupled* weight decay (``torch.optim.AdamW``'s ``weight_decay``) instead
shrinks the weights directly, ``w -= lr * wd * w``. With plain SGD both are the same update.

Example::

    from lightning_tricks.recipes.regularization import classification_loss, penalty

    loss = classification_loss(logits, y, label_smoothing=0.1) + penalty(model, l1=0.0, l2=5e-4)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tricks.recipes.optim import split_decay_parameters

SMOOTHING_CONVENTIONS: tuple[str, ...] = ("uniform", "off_target")


@dataclass(frozen=True)
class RegularizationConfig:
    """Regularisation settings of a classifier.

    Args:
        l2: Coefficient of the loss penalty ``l2/2 * ||w||^2`` (not the optimizer's weight decay).
        l1: Coefficient of the loss penalty ``l1 * ||w||_1``; ``l1 > 0`` and ``l2 > 0`` is elastic net.
        penalize_norm_and_bias: Penalise normalization-layer parameters and biases too (by default only
            the weights, with the split of :func:`~lightning_tricks.recipes.optim.param_groups`).
        label_smoothing: Smoothing ``eps`` in ``[0, 1)``.
        label_smoothing_convention: ``"uniform"`` (PyTorch: ``(1-eps)`` one-hot ``+ eps/C`` on every class)
            or ``"off_target"`` (``1-eps`` on the true class, ``eps/(C-1)`` on each other class).
        dropout: Dropout probability of the model's classifier, in ``[0, 1)``.
        drop_connect: DropConnect probability of the model's classifier, in ``[0, 1)``.
        jsd_lambda: Weight of AugMix's Jensen-Shannon consistency term (12 in Hendrycks et al. 2020;
            0: off); needs the DataModule's ``augmix_jsd`` views (see
            :mod:`~lightning_tricks.recipes.consistency`).

    Example::

        RegularizationConfig(l2=5e-4, label_smoothing=0.1, dropout=0.5)
    """

    l2: float = 0.0
    l1: float = 0.0
    penalize_norm_and_bias: bool = False
    label_smoothing: float = 0.0
    label_smoothing_convention: str = "uniform"
    dropout: float = 0.0
    drop_connect: float = 0.0
    jsd_lambda: float = 0.0

    def __post_init__(self) -> None:
        for name in ("l2", "l1", "jsd_lambda"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"regularization.{name} must be >= 0, got {value}; use 0 to disable it")
        for name in ("label_smoothing", "dropout", "drop_connect"):
            value = getattr(self, name)
            if not 0 <= value < 1:
                raise ValueError(f"regularization.{name} must be in [0, 1), got {value}; e.g. 0.1")
        if self.label_smoothing_convention not in SMOOTHING_CONVENTIONS:
            raise ValueError(
                f"regularization.label_smoothing_convention={self.label_smoothing_convention!r} is unknown; "
                f"valid: {', '.join(SMOOTHING_CONVENTIONS)}"
            )


def penalty(model: nn.Module, l1: float, l2: float, include_norm_and_bias: bool = False) -> Tensor:
    """``l1 * ||w||_1 + l2/2 * ||w||^2`` over the trainable weights of ``model``.

    Args:
        model: Model whose parameters are penalised.
        l1: L1 coefficient.
        l2: L2 coefficient (the ``1/2`` makes the gradient ``l2 * w``).
        include_norm_and_bias: Also penalise normalization-layer parameters and biases.

    Returns:
        A scalar tensor on the device (and in the dtype) of the model's parameters.

    Example::

        loss = loss + penalty(model, l1=1e-5, l2=1e-4)
    """
    decay, no_decay = split_decay_parameters(model)
    params = decay + no_decay if include_norm_and_bias else decay
    first = next(iter(model.parameters()), None)
    total = torch.zeros((), device=first.device if first is not None else None)
    if first is not None and first.is_floating_point():
        total = total.to(first.dtype)
    for p in params:
        if l2:
            total = total + (l2 / 2) * p.pow(2).sum()
        if l1:
            total = total + l1 * p.abs().sum()
    return total


def smooth_targets(
    targets: Tensor,
    num_classes: int,
    eps: float,
    convention: str = "uniform",
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Smoothed target distributions.

    Args:
        targets: Class indices ``(N,)`` or already-soft float targets ``(N, C)`` (e.g. from mixup).
        num_classes: Number of classes ``C``.
        eps: Smoothing in ``[0, 1)``.
        convention: ``"uniform"``: ``(1-eps) * t + eps/C``; ``"off_target"``: ``(1-eps) * t +
            eps * (1-t) / (C-1)``, i.e. ``1-eps`` on the true class and ``eps/(C-1)`` elsewhere
            for one-hot ``t``.
        dtype: Float dtype of the result for index targets (default: the default dtype).

    Returns:
        ``(N, C)`` rows summing to 1.

    Example::

        smooth_targets(torch.tensor([2]), 4, 0.2, "off_target")  # [[0.0667, 0.0667, 0.8, 0.0667]]
    """
    if not 0 <= eps < 1:
        raise ValueError(f"label smoothing eps must be in [0, 1), got {eps}")
    if convention not in SMOOTHING_CONVENTIONS:
        raise ValueError(f"unknown label smoothing convention {convention!r}; valid: {SMOOTHING_CONVENTIONS}")
    if targets.is_floating_point():
        if targets.ndim != 2 or targets.shape[1] != num_classes:
            raise ValueError(f"soft targets must have shape (N, {num_classes}), got {tuple(targets.shape)}")
        t = targets
    else:
        t = F.one_hot(targets.long(), num_classes).to(dtype or torch.get_default_dtype())
    if convention == "uniform":
        return (1 - eps) * t + eps / num_classes
    if num_classes < 2:
        raise ValueError("the 'off_target' convention needs at least 2 classes")
    return (1 - eps) * t + eps * (1 - t) / (num_classes - 1)


def classification_loss(
    logits: Tensor, targets: Tensor, label_smoothing: float = 0.0, convention: str = "uniform"
) -> Tensor:
    """Mean cross-entropy of ``logits`` ``(N, C)`` against index ``(N,)`` or soft ``(N, C)`` targets.

    Args:
        logits: Unnormalised scores.
        targets: Class indices or target distributions.
        label_smoothing: Smoothing ``eps`` in ``[0, 1)``.
        convention: ``"uniform"`` or ``"off_target"`` (see :func:`smooth_targets`).

    Example::

        loss = classification_loss(model(x), y, label_smoothing=0.1, convention="off_target")
    """
    if not targets.is_floating_point() and (convention == "uniform" or label_smoothing == 0):
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    q = smooth_targets(targets, logits.shape[1], label_smoothing, convention, dtype=logits.dtype)
    return -(q * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
