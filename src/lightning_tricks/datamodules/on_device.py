"""Vectorised batch augmentation on the training device for in-memory image tensors.

One gather per batch replaces a per-sample Python loop: random crops of the (reflect- or
zero-) padded image are read with advanced indexing, without materialising the padded batch,
and flips are one ``torch.where``. The distribution matches torchvision's per-sample
``RandomCrop(size, padding=pad)`` + ``RandomHorizontalFlip()``: crop offsets uniform in
``[0, 2 * pad]`` per axis, flips with probability 0.5.

Example::

    augment = OnDeviceAugment(["crop_flip"], pad=4)
    images = augment(images_uint8_on_gpu)  # (N, C, H, W), same dtype and device
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PAD_MODES = ("reflect", "zeros")
ON_DEVICE_PRESETS = ("none", "flip", "translate", "crop_flip")


def _source_index(offsets: torch.Tensor, size: int, pad: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices into the unpadded axis for output positions ``offset + i - pad`` and a validity mask."""
    index = offsets[:, None] + torch.arange(size, device=offsets.device)[None, :] - pad
    if mode == "reflect":
        # Reflection without repeating the edge pixel, like torch.nn.functional.pad(mode="reflect").
        index = index.abs()
        index = torch.where(index >= size, 2 * (size - 1) - index, index)
        return index, torch.ones_like(index, dtype=torch.bool)
    valid = (index >= 0) & (index < size)
    return index.clamp(0, size - 1), valid


def crop_with_offsets(
    images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, pad: int, mode: str = "reflect"
) -> torch.Tensor:
    """Crop each padded image at its own offset: ``out[n] = pad(images[n])[:, dy[n]:dy[n]+H, dx[n]:dx[n]+W]``.

    Args:
        images: ``(N, C, H, W)`` of any dtype.
        dy: ``(N,)`` int64 row offsets in ``[0, 2 * pad]``.
        dx: ``(N,)`` int64 column offsets in ``[0, 2 * pad]``.
        pad: Padding on every side.
        mode: ``"reflect"`` or ``"zeros"``.
    """
    if mode not in PAD_MODES:
        raise ValueError(f"pad mode must be one of {PAD_MODES}, got {mode!r}")
    n, c, h, w = images.shape
    if mode == "reflect" and pad >= min(h, w):
        raise ValueError(f"reflect padding needs pad < image side, got pad={pad} for {h}x{w} images")
    rows, row_ok = _source_index(dy, h, pad, mode)
    cols, col_ok = _source_index(dx, w, pad, mode)
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    out = images[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]
    if mode == "zeros":
        mask = (row_ok[:, :, None] & col_ok[:, None, :])[:, None]
        out = out * mask.to(out.dtype)
    return out


def random_crop(
    images: torch.Tensor, pad: int, mode: str = "reflect", generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels per axis (pad-and-crop back to the input size)."""
    if pad == 0:
        return images
    n = images.shape[0]
    dy = torch.randint(0, 2 * pad + 1, (n,), device=images.device, generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), device=images.device, generator=generator)
    return crop_with_offsets(images, dy, dx, pad, mode)


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
                images = random_crop(images, self.pad, self.pad_mode, generator)
            if name in ("flip", "crop_flip"):
                images = random_flip(images, self.flip_p, generator)
        return images

    def __repr__(self) -> str:
        return f"{type(self).__name__}(presets={self.presets}, pad={self.pad}, pad_mode={self.pad_mode!r})"
