"""Pixel-level distortions torchvision lacks: salt-and-pepper noise and radial lens distortion.

Both work on one image ``(C, H, W)`` or a batch ``(N, C, H, W)`` of any dtype with one random draw
per image, so the same code serves the per-sample ``transforms.v2`` pipeline (CPU workers) and the
vectorised on-device path of the in-memory DataModules, with the same distribution on both.

Example::

    noisy = salt_and_pepper(images_uint8, fraction=0.05)  # ~5% of pixels set to 0 or 255
    warped = lens_distort(images, k=torch.full((len(images),), 0.2))  # barrel distortion
    augment = v2.Compose([SaltAndPepper(0.05), LensDistortion((-0.2, 0.2))])
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

#: Allowed range of the radial coefficient ``k``: below -1/3 the map folds over at the corners.
LENS_K_RANGE = (-1 / 3, 1.0)
PADDING_MODES = ("zeros", "border", "reflection")


def _batched(images: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if images.ndim not in (3, 4):
        raise ValueError(f"expected an image (C, H, W) or a batch (N, C, H, W), got {tuple(images.shape)}")
    return (images, True) if images.ndim == 4 else (images.unsqueeze(0), False)


def _value_range(images: torch.Tensor) -> tuple[float, float]:
    """Black and white of the dtype: 0/255 for uint8, 0/1 for float images in [0, 1]."""
    if images.is_floating_point():
        return 0.0, 1.0
    return 0.0, float(torch.iinfo(images.dtype).max)


def check_fraction(option: str, value: float, example: float) -> None:
    """``salt_pepper``'s ``option`` must lie in [0, 1], else a ``ValueError`` naming key and fix."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"augment_kwargs.salt_pepper.{option}={value} is out of range: it must lie in [0, 1]; "
            f"e.g. augment_kwargs: {{salt_pepper: {{{option}: {example}}}}}"
        )


def salt_and_pepper(
    images: torch.Tensor, fraction: float, salt: float = 0.5, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Set each pixel (all its channels) to white with probability ``fraction * salt`` and to black
    with probability ``fraction * (1 - salt)``; the rest are unchanged.

    Args:
        images: ``(C, H, W)`` or ``(N, C, H, W)``, uint8 or float in [0, 1].
        fraction: Expected fraction of pixels replaced, in [0, 1].
        salt: Share of the replaced pixels set to white (the rest black), in [0, 1].
        generator: Random stream (default: the global one of the images' device).
    """
    check_fraction("fraction", fraction, 0.05)
    check_fraction("salt", salt, 0.5)
    batch, batched = _batched(images)
    n, _, h, w = batch.shape
    draw = torch.rand(n, 1, h, w, device=batch.device, generator=generator)
    black, white = (torch.tensor(v, dtype=batch.dtype, device=batch.device) for v in _value_range(batch))
    out = torch.where(draw < fraction * salt, white, batch)
    out = torch.where((draw >= fraction * salt) & (draw < fraction), black, out)
    return out if batched else out[0]


def lens_grid(k: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``grid_sample`` grid of the radial map ``source = p * (1 + k * r^2)`` per image.

    ``p`` are the output pixel centres in normalised coordinates ([-1, 1], ``align_corners=False``)
    and ``r^2 = (x^2 + y^2) / 2`` is the squared radius scaled so that the corners have ``r = 1``.
    ``k > 0`` samples from further out: barrel distortion; ``k < 0``: pincushion.
    """
    ys = (torch.arange(height, device=k.device, dtype=torch.float32) * 2 + 1) / height - 1
    xs = (torch.arange(width, device=k.device, dtype=torch.float32) * 2 + 1) / width - 1
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    scale = 1 + k.float()[:, None, None] * (x * x + y * y) / 2
    return torch.stack((x * scale, y * scale), dim=-1)  # (N, H, W, 2), x first as grid_sample reads it


def lens_distort(images: torch.Tensor, k: torch.Tensor, padding_mode: str = "reflection") -> torch.Tensor:
    """Radial (barrel ``k > 0`` / pincushion ``k < 0``) lens distortion, one ``k`` per image.

    Hand-written because torchvision has no lens-distortion transform: a coordinate map
    (:func:`lens_grid`) resampled bilinearly with ``grid_sample``. Keeps shape and dtype.

    Args:
        images: ``(C, H, W)`` or ``(N, C, H, W)``, any dtype.
        k: ``(N,)`` (or a scalar for one image) radial coefficients.
        padding_mode: ``grid_sample``'s ``"zeros"``, ``"border"`` or ``"reflection"``.
    """
    check_padding_mode(padding_mode)
    batch, batched = _batched(images)
    k = k.reshape(-1).to(batch.device)
    if len(k) != len(batch):
        raise ValueError(f"need one k per image: {len(batch)} images, {len(k)} values of k")
    grid = lens_grid(k, batch.shape[-2], batch.shape[-1])
    work = batch if batch.is_floating_point() else batch.float()
    out = F.grid_sample(
        work, grid.to(work.dtype), mode="bilinear", padding_mode=padding_mode, align_corners=False
    )
    if not batch.is_floating_point():
        black, white = _value_range(batch)
        out = out.round().clamp(black, white).to(batch.dtype)
    return out if batched else out[0]


def check_padding_mode(padding_mode: str) -> str:
    """One of :data:`PADDING_MODES`, else a ``ValueError`` naming the key and the choices."""
    if padding_mode not in PADDING_MODES:
        raise ValueError(
            f"augment_kwargs.lens_distortion.padding_mode={padding_mode!r} is unknown; "
            f"choose one of {list(PADDING_MODES)}"
        )
    return padding_mode


def check_lens_k(k: Sequence[float]) -> tuple[float, float]:
    """``(low, high)`` with ``LENS_K_RANGE[0] < low <= high <= LENS_K_RANGE[1]``, or a ``ValueError``."""
    given = [k, k] if isinstance(k, (int, float)) else list(k)
    if len(given) != 2:
        raise ValueError(f"augment_kwargs.lens_distortion.k must be one number or [low, high], got {k}")
    low, high = map(float, given)
    lowest, highest = LENS_K_RANGE
    if not lowest < low <= high <= highest:
        raise ValueError(
            f"augment_kwargs.lens_distortion.k={k} is out of range: "
            f"need {lowest:.3f} < low <= high <= {highest} (below -1/3 the map folds over at the "
            "corners); e.g. augment_kwargs: {lens_distortion: {k: [-0.2, 0.2]}}"
        )
    return low, high


def random_lens_distortion(
    images: torch.Tensor,
    k: Sequence[float],
    padding_mode: str = "reflection",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`lens_distort` with ``k`` drawn uniformly from ``[low, high]`` per image."""
    low, high = check_lens_k(k)
    batch, batched = _batched(images)
    draws = torch.rand(len(batch), device=batch.device, generator=generator) * (high - low) + low
    out = lens_distort(batch, draws, padding_mode)
    return out if batched else out[0]


class SaltAndPepper(nn.Module):
    """Salt-and-pepper (pixel-flip) noise as a transform (see :func:`salt_and_pepper`).

    Example::

        transform = v2.Compose([v2.RandomCrop(32, padding=4), SaltAndPepper(fraction=0.05)])
    """

    def __init__(self, fraction: float = 0.05, salt: float = 0.5) -> None:
        super().__init__()
        check_fraction("fraction", fraction, 0.05)
        check_fraction("salt", salt, 0.5)
        self.fraction = fraction
        self.salt = salt

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return salt_and_pepper(images, self.fraction, self.salt, generator)

    def extra_repr(self) -> str:
        return f"fraction={self.fraction}, salt={self.salt}"


class LensDistortion(nn.Module):
    """Random radial lens distortion as a transform (see :func:`random_lens_distortion`).

    Example::

        transform = LensDistortion(k=(-0.2, 0.2))  # pincushion to barrel, uniform per image
    """

    def __init__(self, k: Sequence[float] = (-0.2, 0.2), padding_mode: str = "reflection") -> None:
        super().__init__()
        self.k = check_lens_k(k)
        self.padding_mode = check_padding_mode(padding_mode)

    def forward(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_lens_distortion(images, self.k, self.padding_mode, generator)

    def extra_repr(self) -> str:
        return f"k={self.k}, padding_mode={self.padding_mode!r}"
