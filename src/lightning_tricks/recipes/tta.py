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
* ``multi_scale_ten_crop``: the ten crops of ``crop_size`` at each of five scales (50 views; the
  ResNet paper's short sides 224, 256, 384, 480 and 640 with 224 crops for 256-pixel test images).
* ``flip_translate``: the image and the image shifted by one pixel up-left and down-right
  (reflect-padded, same size), each also mirrored (6 views; airbench's level-2 TTA, here with
  equal weights on the probabilities).
* ``dense``: the lectures' (OverFeat/VGG) dense evaluation: the network applied fully
  convolutionally to the whole image, its classifier acting on every position of the last feature
  map as a 1x1 convolution; the per-position class probabilities are averaged spatially, and over
  the image and its mirror. Needs a network whose classifier follows a global *average* pooling
  layer (``nn.AdaptiveAvgPool2d(1)``), see :func:`global_average_pool`.
* ``color_pca``: the image and the image shifted by ``+-alpha * eigval_k * eigvec_k`` along each
  principal component ``k`` of the training pixels' colour covariance (AlexNet's PCA lighting at
  its +-1 standard-deviation points, ``2C + 1`` views); the shifts are passed in model-input units
  (see :func:`color_pca_shifts`).

Example::

    probs = tta_probabilities(model, images, "ten_crop")          # (N, num_classes), rows sum to 1
    probs = tta_probabilities(model, images, "multi_scale", scales=(224, 256, 288))
    probs = tta_probabilities(model, images, "dense")              # model: nn.Module with avg pooling
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.transforms.v2 import functional as TF

TTA_MODES = (
    "hflip",
    "ten_crop",
    "multi_scale",
    "flip_translate",
    "dense",
    "multi_scale_ten_crop",
    "color_pca",
)
#: Modes whose views are crops of larger test images: plain accuracy is measured on the centre crop.
CROP_MODES = ("ten_crop", "multi_scale_ten_crop")
#: The options each mode accepts (``ImageClassifier(tta_kwargs={mode: {option: value}})``).
TTA_OPTIONS: dict[str, tuple[str, ...]] = {
    "hflip": (),
    "ten_crop": ("crop_size",),
    "multi_scale": ("scales",),
    "flip_translate": (),
    "dense": (),
    "multi_scale_ten_crop": ("crop_size", "scales"),
    "color_pca": ("alpha",),
}
TRANSLATE_SHIFT = 1  # pixels, flip_translate
DEFAULT_CROP_FRACTION = 0.875  # 224 / 256, the ImageNet evaluation ratio
DEFAULT_SCALE_FACTORS = (0.875, 1.0, 1.125)  # 224, 256, 288 for 256-pixel test images
# 224, 256, 384, 480, 640 for 256-pixel test images: the ResNet paper's five test scales
TEN_CROP_SCALE_FACTORS = (0.875, 1.0, 1.5, 1.875, 2.5)
COLOR_PCA_ALPHA = 0.1  # AlexNet's standard deviation of the lighting coefficients


def _crop_side(images: Tensor, crop_size: int | None) -> int:
    return crop_size if crop_size is not None else round(min(images.shape[-2:]) * DEFAULT_CROP_FRACTION)


def _scaled(
    images: Tensor, mode: str, scales: Sequence[int] | None, factors: Sequence[float]
) -> Iterator[Tensor]:
    side = min(images.shape[-2:])
    sizes = list(scales) if scales is not None else [round(side * f) for f in factors]
    if any(size < 1 for size in sizes):
        raise ValueError(f"{mode} scales must be >= 1, got {sizes}")
    for size in sizes:
        yield images if size == side else TF.resize(images, [size], antialias=True)


def _ten_crops(images: Tensor, mode: str, crop: int) -> Sequence[Tensor]:
    side = min(images.shape[-2:])
    if not 0 < crop <= side:
        raise ValueError(f"{mode} needs 0 < crop_size <= image side {side}, got crop_size={crop}")
    return TF.ten_crop(images, [crop, crop])


def _views(
    images: Tensor,
    mode: str,
    crop_size: int | None,
    scales: Sequence[int] | None,
    color_shifts: Sequence[Tensor] | None,
) -> Iterator[Tensor]:
    if mode == "hflip":
        yield images
        yield images.flip(-1)
    elif mode == "flip_translate":
        yield from _flip_translate_views(images, TRANSLATE_SHIFT)
    elif mode == "ten_crop":
        yield from _ten_crops(images, mode, _crop_side(images, crop_size))
    elif mode == "multi_scale_ten_crop":
        crop = _crop_side(images, crop_size)
        for resized in _scaled(images, mode, scales, TEN_CROP_SCALE_FACTORS):
            yield from _ten_crops(resized, mode, crop)
    elif mode == "multi_scale":
        for resized in _scaled(images, mode, scales, DEFAULT_SCALE_FACTORS):
            yield resized
            yield resized.flip(-1)
    elif mode == "color_pca":
        if color_shifts is None:
            raise ValueError("color_pca needs color_shifts (see color_pca_shifts), got None")
        yield images
        for shift in color_shifts:
            yield images + shift.to(images.device, images.dtype)


def _flip_translate_views(images: Tensor, shift: int) -> Iterator[Tensor]:
    height, width = images.shape[-2:]
    padded = torch.nn.functional.pad(images, (shift,) * 4, mode="reflect")
    for offset in (shift, 0, 2 * shift):  # unshifted, then by one pixel each way along both axes
        view = padded[..., offset : offset + height, offset : offset + width]
        yield view
        yield view.flip(-1)


def plain_view(images: Tensor, mode: str | Sequence[str], crop_size: int | None = None) -> Tensor:
    """The single un-augmented view that plain accuracy is measured on beside the modes' averages:
    the centre crop when a mode of :data:`CROP_MODES` is among them (their larger test images), the
    images themselves otherwise.

    Example::

        plain_logits = model(plain_view(images, "ten_crop"))  # centre 224 crop of 256 images
    """
    modes = [mode] if isinstance(mode, str) else list(mode)
    if not any(m in CROP_MODES for m in modes):
        return images
    crop = _crop_side(images, crop_size)
    return TF.center_crop(images, [crop, crop])


def global_average_pool(model: nn.Module) -> nn.AdaptiveAvgPool2d:
    """The last global average pooling layer of ``model`` (``nn.AdaptiveAvgPool2d`` to 1x1): the layer
    whose input the ``dense`` mode classifies position by position.

    Raises:
        ValueError: ``model`` has none (an MLP, a global *max* pool, pooling to a grid larger than 1x1
            as in VGG/AlexNet, or pooling written as a function call): there is no per-position
            classifier whose average equals the network's output, so dense evaluation does not apply.
    """
    pools = [
        m
        for m in model.modules()
        if isinstance(m, nn.AdaptiveAvgPool2d) and m.output_size in (1, (1, 1), [1, 1])
    ]
    if not pools:
        raise ValueError(
            f"tta='dense' needs a network whose classifier follows global average pooling "
            f"(an nn.AdaptiveAvgPool2d(1) layer), and {type(model).__name__} has none; "
            "use another tta mode (hflip, multi_scale, ...) for this model"
        )
    return pools[-1]


def dense_probabilities(model: nn.Module, images: Tensor) -> Tensor:
    """Per-position class probabilities of ``model`` on the whole ``images``, averaged spatially.

    A forward hook turns the global pooling layer's ``(N, C, 1, 1)`` output into the ``(N*h*w, C, 1,
    1)`` stack of the feature map's positions, so the layers after it (flatten, dropout, the linear
    classifier: a 1x1 convolution over the map) score every position; the result is
    ``mean_positions softmax(scores)``, ``(N, num_classes)``.
    """
    pool = global_average_pool(model)
    positions: list[int] = []

    def per_position(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        features = args[0]
        n, c, h, w = features.shape
        positions.append(h * w)
        return features.permute(0, 2, 3, 1).reshape(n * h * w, c, 1, 1)

    handle = pool.register_forward_hook(per_position)
    try:
        scores = model(images)
    finally:
        handle.remove()
    n = images.shape[0]
    if len(positions) != 1 or scores.shape[0] != n * positions[0]:
        raise ValueError(
            f"tta='dense' could not score {type(model).__name__} per position: the global pooling layer "
            f"ran {len(positions)} times or the output {tuple(scores.shape)} is not one row per position"
        )
    return scores.float().softmax(-1).view(n, positions[0], -1).mean(1)


def color_pca_shifts(
    eigval: Tensor,
    eigvec: Tensor,
    like: Tensor,
    alpha: float = COLOR_PCA_ALPHA,
    preprocess: Callable[[Tensor], Tensor] | None = None,
) -> list[Tensor]:
    """The ``2C`` input shifts of ``color_pca``: ``+alpha`` then ``-alpha`` times ``eigval_k * eigvec_k``
    for each principal component ``k`` (AlexNet's PCA lighting), in model-input units.

    The shift is added to pixels in [0, 1] units; ``preprocess`` (e.g. the DataModule's
    ``stats.apply``: centring, division by the std, whitening; all affine) maps it to the units of
    the preprocessed test batch ``like`` as ``preprocess(0 + shift) - preprocess(0)``.

    Example::

        shifts = color_pca_shifts(dm.stats.eigval, dm.stats.eigvec, images, preprocess=dm.stats.apply)
        probs = tta_probabilities(model, images, "color_pca", color_shifts=shifts)
    """
    if not alpha > 0:
        raise ValueError(f"color_pca alpha must be > 0, got {alpha}; e.g. {COLOR_PCA_ALPHA} (AlexNet's)")
    channels = like.shape[1]
    if eigval.shape != (channels,) or eigvec.shape != (channels, channels):
        raise ValueError(
            f"color_pca needs a colour PCA of {channels} channels, got eigval {tuple(eigval.shape)} "
            f"and eigvec {tuple(eigvec.shape)}"
        )
    base = torch.zeros((1, *like.shape[1:]), device=like.device)
    ref = preprocess(base) if preprocess is not None else base
    shifts = []
    for k in range(channels):
        for sign in (1.0, -1.0):
            pixel_shift = (sign * alpha * eigval[k] * eigvec[:, k]).to(like.device)
            shifted = base + pixel_shift.view(1, -1, 1, 1)
            shifts.append((preprocess(shifted) if preprocess is not None else shifted) - ref)
    return shifts


@torch.no_grad()
def tta_probabilities(
    forward: Callable[[Tensor], Tensor],
    images: Tensor,
    mode: str,
    crop_size: int | None = None,
    scales: Sequence[int] | None = None,
    color_shifts: Sequence[Tensor] | None = None,
) -> Tensor:
    """Mean of ``softmax(forward(view))`` over the views of ``mode``.

    Args:
        forward: Maps a ``(N, C, H, W)`` float batch to ``(N, num_classes)`` logits (a model or
            a LightningModule; an ``nn.Module`` for ``dense``).
        images: Preprocessed ``(N, C, H, W)`` float batch.
        mode: One of :data:`TTA_MODES`.
        crop_size: ``ten_crop``/``multi_scale_ten_crop`` crop side (default ``round(0.875 * short
            side)``: 224 for 256).
        scales: ``multi_scale`` short sides (default 0.875, 1.0, 1.125 times the short side);
            ``multi_scale_ten_crop`` short sides (default 0.875, 1, 1.5, 1.875, 2.5 times it).
        color_shifts: ``color_pca``'s input shifts (:func:`color_pca_shifts`).

    Returns:
        ``(N, num_classes)`` float probabilities.

    Raises:
        ValueError: On an unknown mode, a bad crop size or non-4D images.
    """
    if mode not in TTA_MODES:
        raise ValueError(f"unknown TTA mode {mode!r}; valid modes are {list(TTA_MODES)}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if mode == "dense":
        if not isinstance(forward, nn.Module):
            raise ValueError(f"tta='dense' needs an nn.Module to find its pooling layer, got {type(forward)}")
        return (dense_probabilities(forward, images) + dense_probabilities(forward, images.flip(-1))) / 2
    total: Tensor | None = None
    count = 0
    for view in _views(images, mode, crop_size, scales, color_shifts):
        probs = forward(view).float().softmax(dim=-1)
        total = probs if total is None else total + probs
        count += 1
    assert total is not None
    return total / count


def check_tta(tta: str | Sequence[str] | None, tta_kwargs: dict[str, dict[str, Any]] | None) -> list[str]:
    """The list of modes in ``tta`` after checking them and ``tta_kwargs`` (``ValueError`` naming the key).

    Example::

        check_tta(["ten_crop", "dense"], {"ten_crop": {"crop_size": 224}})  # ["ten_crop", "dense"]
    """
    modes = [] if tta is None else [tta] if isinstance(tta, str) else list(tta)
    unknown = [m for m in modes if m not in TTA_MODES]
    if unknown:
        raise ValueError(f"tta must be None, one or a list of {', '.join(TTA_MODES)}; got {unknown}")
    if len(set(modes)) != len(modes):
        raise ValueError(f"tta lists a mode twice: {modes}; list each once")
    for mode, options in (tta_kwargs or {}).items():
        if mode not in modes:
            raise ValueError(
                f"tta_kwargs has an entry for {mode!r}, which is not in tta={modes}; add it or drop it"
            )
        bad = [k for k in options if k not in TTA_OPTIONS[mode]]
        if bad:
            raise ValueError(
                f"tta_kwargs.{mode} has unknown option(s) {bad}; "
                f"{mode} accepts {list(TTA_OPTIONS[mode]) or 'none'}"
            )
        crop = options.get("crop_size")
        if crop is not None and (isinstance(crop, bool) or not isinstance(crop, int) or crop < 1):
            raise ValueError(f"tta_kwargs.{mode}.crop_size must be an integer >= 1, got {crop!r}")
        scales = options.get("scales")
        if scales is not None and (not scales or any(not isinstance(s, int) or s < 1 for s in scales)):
            raise ValueError(
                f"tta_kwargs.{mode}.scales must be a non-empty list of integers >= 1, got {scales!r}"
            )
        if crop is not None and scales is not None and crop > min(scales):
            raise ValueError(
                f"tta_kwargs.{mode}.crop_size={crop} exceeds the smallest scale {min(scales)}; "
                "lower crop_size or raise the scales"
            )
        alpha = options.get("alpha")
        if alpha is not None and not (isinstance(alpha, (int, float)) and alpha > 0):
            raise ValueError(f"tta_kwargs.{mode}.alpha must be > 0, got {alpha!r}; e.g. {COLOR_PCA_ALPHA}")
    return modes
