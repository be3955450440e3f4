"""Vectorised batch augmentation on the training device for in-memory image tensors.

A single ``gather`` with per-image source indices replaces a per-sample Python loop: every
image's crop (mirrored or not, reflect- or zero-padded) is picked without building a padded copy.
The distribution matches torchvision's per-sample ``RandomCrop(size, padding=pad)`` +
``RandomHorizontalFlip()``: crop offsets uniform in ``[0, 2 * pad]`` per axis, flips with
probability 0.5.

Salt-and-pepper noise and lens distortion run batched with one random draw per image
(:mod:`~lightning_tricks.datamodules.distortions`, the same code as their per-sample presets).

Example::

    augment = OnDeviceAugment(["crop_flip", "salt_pepper"], pad=4,
                              options={"salt_pepper": {"fraction": 0.02}})
    images = augment(images_uint8_on_gpu)  # (N, C, H, W), same dtype and device
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from lightning_tricks.datamodules.distortions import LensDistortion, SaltAndPepper

PAD_MODES = ("reflect", "zeros")
# Batched modules of these presets take their options from ``augment_kwargs``.
BATCHED_MODULES: dict[str, Callable[..., Any]] = {
    "salt_pepper": SaltAndPepper,
    "lens_distortion": LensDistortion,
}
ON_DEVICE_PRESETS = ("none", "flip", "translate", "crop_flip", *BATCHED_MODULES)


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Map coordinates in ``[-pad, size + pad)`` to their source pixel under reflect padding
    (the edge pixel is not repeated, as in ``F.pad(mode="reflect")``)."""
    index = index.abs()
    return torch.where(index >= size, 2 * (size - 1) - index, index)


def crop_with_offsets(
    images: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    pad: int,
    mode: str = "reflect",
    flip: torch.Tensor | None = None,
) -> torch.Tensor:
    """Crop each padded image at its own offset, optionally mirrored, in one gather.

    ``out[n] = pad(images[n])[:, dy[n]:dy[n]+H, dx[n]:dx[n]+W]``, flipped left-right where
    ``flip[n]``. The padded batch is never built: each output pixel's source index in the
    unpadded image is computed directly (reflected, or clamped and masked for zero padding),
    so the whole augmentation is a single ``gather`` over ``(N, C, H*W)``.

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
    rows = dy[:, None] - pad + torch.arange(h, device=images.device)
    cols = torch.arange(w, device=images.device).expand(n, w)
    if flip is not None:
        cols = torch.where(flip[:, None], w - 1 - cols, cols)
    cols = dx[:, None] - pad + cols
    if mode == "reflect":
        source_rows, source_cols = _reflect(rows, h), _reflect(cols, w)
    else:
        source_rows, source_cols = rows.clamp(0, h - 1), cols.clamp(0, w - 1)
    index = (source_rows[:, :, None] * w + source_cols[:, None, :]).reshape(n, 1, h * w)
    out = images.reshape(n, c, h * w).gather(2, index.expand(n, c, h * w)).reshape(n, c, h, w)
    if mode == "zeros":
        inside = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        out = out * inside[:, None].to(out.dtype)
    return out


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
    """The on-device presets (``none``, ``flip``, ``translate``, ``crop_flip``, ``salt_pepper``,
    ``lens_distortion``) as one batch callable.

    Args:
        presets: Names from :data:`ON_DEVICE_PRESETS`, applied in order.
        pad: Maximum translation in pixels for ``translate``/``crop_flip``.
        pad_mode: ``"reflect"`` or ``"zeros"``.
        flip_p: Flip probability for ``flip``/``crop_flip``.
        options: Per-preset keyword options of ``salt_pepper``/``lens_distortion`` (the
            DataModule's ``augment_kwargs``; entries of other presets are ignored here).

    Example::

        augment = OnDeviceAugment(["crop_flip"], pad=4, pad_mode="reflect")
        train_images = augment(train_images)
    """

    def __init__(
        self,
        presets: Sequence[str],
        pad: int = 4,
        pad_mode: str = "reflect",
        flip_p: float = 0.5,
        options: Mapping[str, Mapping[str, Any]] | None = None,
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
        options = options or {}
        self.modules = {}
        for name in set(self.presets) & set(BATCHED_MODULES):
            try:
                self.modules[name] = BATCHED_MODULES[name](**options.get(name, {}))
            except TypeError as err:
                raise ValueError(f"bad augment_kwargs for preset {name!r}: {err}") from err

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for name in self.presets:
            if name in ("translate", "crop_flip"):
                flip_p = self.flip_p if name == "crop_flip" else 0.0
                images = random_crop(images, self.pad, self.pad_mode, flip_p, generator)
            elif name == "flip":
                images = random_flip(images, self.flip_p, generator)
            elif name in self.modules:
                images = self.modules[name](images, generator)
        return images

    def __repr__(self) -> str:
        return f"{type(self).__name__}(presets={self.presets}, pad={self.pad}, pad_mode={self.pad_mode!r})"
