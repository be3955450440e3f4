"""AugMix's Jensen-Shannon consistency loss (Hendrycks et al. 2020) on timm's batch layout.

A batch of ``3N`` images ``[clean; AugMix view 1; AugMix view 2]`` (the DataModules' ``augmix_jsd``)
is trained with ``CE(clean) + lambda * JS(p_clean, p_view1, p_view2)``, where
``JS(p_1..p_k) = 1/k * sum_i KL(p_i || M)`` with the mixture ``M = 1/k * sum_i p_i``. Hand-written
because torch has no Jensen-Shannon loss and timm's ``JsdCrossEntropy`` is an optional dependency.

Example::

    clean, first, second = split_views(logits, 3)
    loss = F.cross_entropy(clean, targets[: len(clean)]) + 12 * jensen_shannon(clean, first, second)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

#: Views per image in the AugMix JSD batch: the clean image and two AugMix draws.
AUGMIX_VIEWS = 3


def jensen_shannon(*logits: Tensor) -> Tensor:
    """Batch mean of the Jensen-Shannon divergence between the softmax distributions of ``logits``.

    As in the paper's code, the mixture is clamped to ``[1e-7, 1]`` before its logarithm.

    Args:
        *logits: Two or more ``(N, C)`` logit tensors of the same images.
    """
    if len(logits) < 2:
        raise ValueError(f"the Jensen-Shannon divergence needs at least two distributions, got {len(logits)}")
    probs = [item.float().softmax(dim=1) for item in logits]
    log_mixture = torch.stack(probs).mean(dim=0).clamp(1e-7, 1).log()
    return sum(F.kl_div(log_mixture, p, reduction="batchmean") for p in probs) / len(probs)


def split_views(logits: Tensor, views: int = AUGMIX_VIEWS) -> tuple[Tensor, ...]:
    """``[view 0; view 1; ...]`` batch -> one ``(N, C)`` chunk per view (fails when it cannot be one)."""
    if len(logits) % views:
        raise ValueError(
            f"regularization.jsd_lambda needs batches of {views} views per image ([clean; AugMix; AugMix]), "
            f"got a batch of {len(logits)} images; set data.init_args.augmix_jsd: true with augmix as the "
            "last preset of data.init_args.augment"
        )
    return logits.chunk(views)
