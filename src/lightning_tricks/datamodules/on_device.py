"""Vectorised batch augmentation on the training device for in-memory image tensors.

One advanced index over strided windows of the padded batch replaces a per-sample Python
loop: every image's crop (mirrored or not) is picked in a single gather.
The distribution matches torchvision's per-sample ``RandomCrop(size, padding=pad)`` +
``RandomHorizontalFlip()``: crop offsets uniform in ``[0, 2 * pad]`` per axis, flips with
probability 0.5.

Example::

    augment = OnDeviceAugment(["crop_flip"], pad=4)
    images = augment(images_uint8_on_gpu)  # (N, C, H, W), same dtype and device
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

PAD_MODES = ("reflect", "zeros")
ON_DEVICE_PRESETS = ("none", "flip", "translate", "crop_flip")


def _pad(images: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
    """Pad H and W by ``pad`` on both sides; reflection from slices so every dtype (uint8) works."""
    if mode == "zeros":
        return F.pad(images, (pad, pad, pad, pad))
    for dim in (2, 3):
        size = images.shape[dim]
        # Reflection without repeating the edge pixel, like F.pad(mode="reflect").
        before = images.narrow(dim, 1, pad).flip(dim)
        after = images.narrow(dim, size - pad - 1, pad).flip(dim)
        images = torch.cat([before, images, after], dim=dim)
    return images


def crop_with_offsets(
    images: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    pad: int,
    mode: str = "reflect",
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop each padded image at its own offset, optionally mirrored, in one indexing op.

    ``out[n] = pad(images[n])[:, dy[n]:dy[n]+H, dx[n]:dx[n]+W]``, flipped left-right where
    ``flip[n]``. Every ``(H, W)`` window of the padded batch is a strided view, so one advanced
    index picks each image's window; a mirrored crop is the window at ``2 * pad - dx`` of the
    mirrored padded image.

    Args:
        images: ``(N, C, H, W)`` of any dtype.
        dy: ``(N,)`` int64 row offsets in ``[0, 2 * pad]``.
        dx: ``(N,)`` int64 column offsets in ``[0, 2 * pad]``.
        pad: Padding on every side.
        mode: ``"reflect"`` or ``"zeros"``.
        flip: Optional ``(N,)`` bool: mirror these crops.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    n, c, h, w = images.shape
    if mode == "reflect" and pad >= min(h, w):
        raise ValueError(f"reflect padding needs pad < image side, got pad={pad} for {h}x{w} images")
    padded = _pad(images, pad, mode)
    batch = torch.arange(n, device=images.device)
    if flip is not None:
        padded = torch.stack([padded, padded.flip(-1)], dim=1).flatten(0, 1)  # (2N, C, H', W')
        batch = 2 * batch + flip.long()
        dx = torch.where(flip, 2 * pad - dx, dx)
    s = padded.stride()
    windows = padded.as_strided(
        (padded.shape[0], c, 2 * pad + 1, 2 * pad + 1, h, w), (s[0], s[1], s[2], s[3], s[2], s[3])
    )
    return windows[batch, :, dy, dx]


def random_crop(
    images: torch.Tensor,
    pad: int,
    mode: str = "reflect",
    flip_p: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels per axis, then a flip with probability ``flip_p``."""
    n = images.shape[0]
    dy = torch.randint(0, 2 * pad + 1, (n,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=images.device, generator=generator)
    flip = torch.rand(n, device=images.device, generator=generator) < flip_p if flip_p > 0 else None
    return crop_with_offsets(images, dy, dx, pad, mode, flip)


def random_flip(
    images: torch.Tensor, p: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Flip each image left-right with probability ``p``."""
    flip = torch.rand(images.shape[0], device=images.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


class OnDeviceAugment:
    """The on-device presets (``none``, ``flip``, ``translate``, ``crop_flip``) as one batch callable.

    Args:
        presets: Names from :data:`ON_DEVICE_PRESETS`, applied in order.
        pad: Maximum translation in pixels for ``translate``/``crop_flip``.
        pad_mode: ``"reflect"`` or ``"zeros"``.
        flip_p: Flip probability for ``flip``/``crop_flip``.

    Example::

        augment = OnDeviceAugment(["crop_flip"], pad=4, pad_mode="reflect")
        train_images = augment(train_images)
    """

    def __init__(
        self, presets: Sequence[str], pad: int = 4, pad_mode: str = "reflect", flip_p: float = 0.5
    ) -> None:
        unknown = [name for name in presets if name not in ON_DEVICE_PRESETS]
        if unknown:
            raise ValueError(
                f"augmentation presets {unknown} cannot run on the device; on-device presets are "
                f"{list(ON_DEVICE_PRESETS)} (set augment_on_device=False for the others)"
            )
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        if pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {PAD_MODES}, got {pad_mode!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p must be in [0, 1], got {flip_p}")
        self.presets = list(presets)
        self.pad = pad
        self.pad_mode = pad_mode
        self.flip_p = flip_p

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for name in self.presets:
            if name in ("translate", "crop_flip"):
                flip_p = self.flip_p if name == "crop_flip" else 0.0
                images = random_crop(images, self.pad, self.pad_mode, flip_p, generator)
            elif name == "flip":
                images = random_flip(images, self.flip_p, generator)
        return images

    def __repr__(self) -> str:
        return f"{type(self).__name__}(presets={self.presets}, pad={self.pad}, pad_mode={self.pad_mode!r})"
