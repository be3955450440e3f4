"""Deterministic test-time augmentation: average softmax probabilities over fixed views.

Modes:

* ``hflip``: the image and its mirror (2 views).
* ``ten_crop``: four corner crops and the centre crop of side ``crop_size``, each also mirrored
  (10 views, the AlexNet/ResNet protocol via ``torchvision.transforms.v2.functional.ten_crop``).
  The test images must be larger than ``crop_size``: with
  :class:`~lightning_tricks.datamodules.folder.ImageFolderDataModule` set
  ``test_center_crop=False`` so test batches are ``resize_size`` squares (256 for 224 crops).
* ``multi_scale``: the image resized to several sides, each also mirrored. The model must accept
  any input size (global pooling), as CNN classifiers do.
* ``flip_translate``: the image and the image shifted by one pixel up-left and down-right
  (reflect-padded, same size), each also mirrored (6 views; airbench's level-2 TTA, here with
  equal weights on the probabilities).

Example::

    probs = tta_probabilities(model, images, "ten_crop")          # (N, num_classes), rows sum to 1
    probs = tta_probabilities(model, images, "multi_scale", scales=(224, 256, 288))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

TTA_MODES = ("hflip", "ten_crop", "multi_scale", "flip_translate")
TRANSLATE_SHIFT = 1  # pixels, flip_translate
DEFAULT_CROP_FRACTION = 0.875  # 224 / 256, the ImageNet evaluation ratio
DEFAULT_SCALE_FACTORS = (0.875, 1.0, 1.125)  # 224, 256, 288 for 256-pixel test images


def _views(
    images: Tensor, mode: str, crop_size: int | None, scales: Sequence[int] | None
) -> Iterator[Tensor]:
    if mode == "hflip":
        yield images
        yield images.flip(-1)
        return
    if mode == "flip_translate":
        yield from _flip_translate_views(images, TRANSLATE_SHIFT)
        return
    side = min(images.shape[-2:])
    if mode == "ten_crop":
        crop = crop_size if crop_size is not None else round(side * DEFAULT_CROP_FRACTION)
        if not 0 < crop <= side:
            raise ValueError(f"ten_crop needs 0 < crop_size <= image side {side}, got crop_size={crop}")
        yield from TF.ten_crop(images, [crop, crop])
        return
    sizes = scales if scales is not None else [round(side * f) for f in DEFAULT_SCALE_FACTORS]
    for size in sizes:
        if size < 1:
            raise ValueError(f"multi_scale sizes must be >= 1, got {list(sizes)}")
        resized = images if size == side else TF.resize(images, [size], antialias=True)
        yield resized
        yield resized.flip(-1)


def _flip_translate_views(images: Tensor, shift: int) -> Iterator[Tensor]:
    height, width = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (shift,) * 4, mode="reflect")
    for offset in (shift, 0, 2 * shift):  # unshifted, then by one pixel each way along both axes
        view = padded[..., offset : offset + height, offset : offset + width]
        yield view
        yield view.flip(-1)


def plain_view(images: Tensor, mode: str, crop_size: int | None = None) -> Tensor:
    """The single un-augmented view that plain accuracy is measured on beside ``mode``'s average:
    the centre crop for ``ten_crop`` (its larger test images), the images themselves otherwise.

    Example::

        plain_logits = model(plain_view(images, "ten_crop"))  # centre 224 crop of 256 images
    """
    if mode != "ten_crop":
        return images
    side = min(images.shape[-2:])
    crop = crop_size if crop_size is not None else round(side * DEFAULT_CROP_FRACTION)
    return TF.center_crop(images, [crop, crop])


@torch.no_grad()
def tta_probabilities(
    forward: Callable[[Tensor], Tensor],
    images: Tensor,
    mode: str,
    crop_size: int | None = None,
    scales: Sequence[int] | None = None,
) -> Tensor:
    """Mean of ``softmax(forward(view))`` over the views of ``mode``.

    Args:
        forward: Maps a ``(N, C, H, W)`` float batch to ``(N, num_classes)`` logits (a model or
            a LightningModule).
        images: Preprocessed ``(N, C, H, W)`` float batch.
        mode: ``"hflip"``, ``"ten_crop"``, ``"multi_scale"`` or ``"flip_translate"``.
        crop_size: ``ten_crop`` crop side (default ``round(0.875 * short side)``: 224 for 256).
        scales: ``multi_scale`` short sides (default 0.875, 1.0, 1.125 times the short side).

    Returns:
        ``(N, num_classes)`` float probabilities.

    Raises:
        ValueError: On an unknown mode, a bad crop size or non-4D images.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; valid modes are {list(TTA_MODES)}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    total: Tensor | None = None
    count = 0
    for view in _views(images, mode, crop_size, scales):
        probs = forward(view).float().softmax(dim=-1)
        total = probs if total is None else total + probs
        count += 1
    assert total is not None
    return total / count
