"""Statistics of the training split, computed once and applied identically to every split.

Example::

    mean, std = channel_mean_std(train_images)  # (C,) each, from uint8 or float images
"""

from __future__ import annotations

import torch


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] or float images in [0, 1] -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def channel_mean_std(images: torch.Tensor, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) standard deviation of ``(N, C, H, W)`` images in [0, 1] units.

    Accumulates sums in float64 over chunks, so uint8 datasets never need a full float copy.
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    channels = images.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    count = 0
    for start in range(0, images.shape[0], chunk_size):
        chunk = to_unit_float(images[start : start + chunk_size]).double()
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.pow(2).sum(dim=(0, 2, 3))
        count += chunk.shape[0] * chunk.shape[2] * chunk.shape[3]
    mean = total / count
    var = (total_sq / count - mean.pow(2)).clamp_min(0.0)
    return mean.float(), var.sqrt().float()
