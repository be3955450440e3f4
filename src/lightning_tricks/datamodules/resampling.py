"""Resampling of training sets: the bootstrap draws that bagging trains each ensemble member on."""

from __future__ import annotations

import torch


def bootstrap_indices(n: int, seed: int) -> torch.Tensor:
    """Indices of a bootstrap resample: ``n`` draws with replacement from ``range(n)``, seeded.

    About ``1 - 1/e`` (63.2%) of the samples appear at least once. The result depends only on ``n`` and
    ``seed``, not on the global RNG. The in-memory DataModules apply it with ``bootstrap_seed``.

    Example:

        >>> idx = bootstrap_indices(1000, seed=0)
        >>> idx.shape, bool((idx == bootstrap_indices(1000, seed=0)).all())
        (torch.Size([1000]), True)
        >>> 0.55 < idx.unique().numel() / 1000 < 0.70
        True
        >>> subset = torch.utils.data.Subset(train_set, idx.tolist())  # doctest: +SKIP
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"`n` must be an integer >= 1, got {n!r}")
    generator = torch.Generator().manual_seed(int(seed))
    return torch.randint(n, (n,), generator=generator)
