"""Augmentation presets by name (torchvision ``transforms.v2``) and batch-level mixup/cutmix.

Presets are picked by name in YAML and compose as a list, applied in order::

    data:
      init_args:
        augment: [crop_flip, random_erasing]
        augment_kwargs: {random_erasing: {p: 0.25}}
        batch_augment: [mixup, cutmix]   # one of them per batch, like timm

Per-sample presets keep the input dtype where torchvision does (uint8 stays uint8, which keeps
host memory and the host-to-device copy small); ``noise`` and ``pca_lighting`` convert to float
in [0, 1] first, ``jpeg`` (which encodes uint8 only) to uint8. ``lens_distortion`` and
``salt_pepper`` are hand-written (:mod:`~lightning_tricks.datamodules.distortions`) and also run
batched on the device; ``augmix`` with the DataModules' ``augmix_jsd`` yields :class:`AugMixViews`.
Normalisation with the training statistics happens later, on the device.

Example::

    transform = build_transform(["crop_flip"], PresetContext(size=32))
    image = transform(image_uint8_chw)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from lightning_tricks.datamodules.distortions import LensDistortion, SaltAndPepper
from lightning_tricks.datamodules.stats import ImageStatistics, to_unit_float

PAD_MODES = {"reflect": "reflect", "zeros": "constant"}
AUTOAUGMENT_POLICIES = {p.name.lower(): p for p in v2.AutoAugmentPolicy}


@dataclass
class PresetContext:
    """What a preset needs to know about the data.

    Args:
        size: Output side of cropping presets (image side for CIFAR, ``crop_size`` for folders).
        pad: Padding of ``translate``/``crop_flip``; ``None`` means ``max(1, size // 8)`` (4 for 32).
        pad_mode: ``"reflect"`` or ``"zeros"``.
        stats: Training statistics (``pca_lighting`` reads its colour PCA at call time, so
            statistics restored from a checkpoint are the ones used).
        autoaugment_policy: ``"imagenet"``, ``"cifar10"`` or ``"svhn"``.
        check_size: ``False`` checks the presets' options without the checks that need the real
            image side (a DataModule's constructor, before the data is known).
    """

    size: int
    pad: int | None = None
    pad_mode: str = "reflect"
    stats: ImageStatistics | None = None
    autoaugment_policy: str = "imagenet"
    check_size: bool = True

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"size must be >= 1, got {self.size}")
        if self.pad is None:
            self.pad = max(1, self.size // 8)
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0, got {self.pad}")
        if self.pad_mode not in PAD_MODES:
            raise ValueError(f"pad_mode must be one of {list(PAD_MODES)}, got {self.pad_mode!r}")
        if self.autoaugment_policy not in AUTOAUGMENT_POLICIES:
            raise ValueError(
                f"autoaugment_policy must be one of {list(AUTOAUGMENT_POLICIES)}, "
                f"got {self.autoaugment_policy!r}"
            )


class PCALighting(nn.Module):
    """AlexNet's colour augmentation: add ``eigvec @ (alpha * eigval)``, ``alpha ~ N(0, std^2)``.

    One ``alpha`` per image, the same shift for every pixel. The eigen-decomposition is the
    training pixels' colour covariance (:func:`~lightning_tricks.datamodules.stats.pixel_pca`).
    Units: ``eigval`` are variances of pixels in [0, 1] and the shift is added to the image in [0, 1]
    (uint8 input is converted first), as with the ImageNet constants ``[0.2175, 0.0188, 0.0045]``
    of fb.resnet.torch and its PyTorch ports. Hand-written because torchvision has no PCA lighting.

    Args:
        stats: Fitted training statistics (``eigval``/``eigvec`` are read on every call), or
        eigval: ``(C,)`` eigenvalues and
        eigvec: ``(C, C)`` eigenvectors as columns, given directly.
        std: Standard deviation of ``alpha`` (0.1 in AlexNet).

    Example::

        lighting = PCALighting(eigval=eigval, eigvec=eigvec, std=0.1)
        out = lighting(images)  # float in [0, 1] units, (C, H, W) or (N, C, H, W)
    """

    def __init__(
        self,
        stats: ImageStatistics | None = None,
        eigval: torch.Tensor | None = None,
        eigvec: torch.Tensor | None = None,
        std: float = 0.1,
    ) -> None:
        super().__init__()
        if std < 0:
            raise ValueError(f"pca_lighting std must be >= 0, got {std}")
        if stats is None and (eigval is None or eigvec is None):
            raise ValueError("PCALighting needs fitted stats or both eigval and eigvec")
        self.stats = stats
        self._eig = (eigval, eigvec)
        self.std = std

    def eigen(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stats is not None:
            if self.stats.eigval is None or self.stats.eigvec is None:
                raise RuntimeError("pca_lighting needs the training colour PCA: call setup() first")
            return self.stats.eigval, self.stats.eigvec
        return self._eig  # type: ignore[return-value]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        eigval, eigvec = self.eigen()
        images = to_unit_float(images)
        batched = images.ndim == 4
        if not batched:
            images = images.unsqueeze(0)
        alpha = torch.randn(images.shape[0], eigval.numel()) * self.std
        shift = (alpha * eigval) @ eigvec.T  # (N, C): sum_i alpha_i * lambda_i * v_i
        out = images + shift.to(images.device, images.dtype)[:, :, None, None]
        return out if batched else out[0]


def _flip(ctx: PresetContext, p: float = 0.5) -> list[Callable]:
    return [v2.RandomHorizontalFlip(p)]


def _translate(ctx: PresetContext, pad: int | None = None) -> list[Callable]:
    pad = ctx.pad if pad is None else pad
    return [v2.RandomCrop(ctx.size, padding=pad, padding_mode=PAD_MODES[ctx.pad_mode])]


def _crop_flip(ctx: PresetContext, pad: int | None = None, p: float = 0.5) -> list[Callable]:
    return _translate(ctx, pad) + _flip(ctx, p)


def _resnet_scale(ctx: PresetContext, min_size: int = 256, max_size: int = 480) -> list[Callable]:
    if not ctx.size <= min_size <= max_size:
        raise ValueError(
            f"resnet_scale needs crop size <= min_size <= max_size, got {ctx.size}, {min_size}, {max_size}"
        )
    # RandomResize draws the short side from [min_size, max_size) and keeps the aspect ratio.
    return [v2.RandomResize(min_size, max_size + 1, antialias=True), v2.RandomCrop(ctx.size), *_flip(ctx)]


def _inception(ctx: PresetContext, scale: Sequence[float] = (0.08, 1.0)) -> list[Callable]:
    return [v2.RandomResizedCrop(ctx.size, scale=tuple(scale), antialias=True)]


def _color_jitter(
    ctx: PresetContext,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.0,
) -> list[Callable]:
    return [v2.ColorJitter(brightness, contrast, saturation, hue)]


def _pca_lighting(ctx: PresetContext, std: float = 0.1) -> list[Callable]:
    if ctx.stats is None:
        raise ValueError("pca_lighting needs the training statistics (the DataModule provides them)")
    return [v2.ToDtype(torch.float32, scale=True), PCALighting(ctx.stats, std=std)]


def _affine(
    ctx: PresetContext, degrees: float = 15.0, translate: float = 0.1, shear: float = 10.0
) -> list[Callable]:
    return [v2.RandomAffine(degrees=degrees, translate=(translate, translate), shear=shear)]


def _noise(ctx: PresetContext, sigma: float = 0.03) -> list[Callable]:
    return [v2.ToDtype(torch.float32, scale=True), v2.GaussianNoise(sigma=sigma, clip=True)]


def _autoaugment(ctx: PresetContext, policy: str | None = None) -> list[Callable]:
    policy = ctx.autoaugment_policy if policy is None else policy
    if policy not in AUTOAUGMENT_POLICIES:
        raise ValueError(f"autoaugment policy must be one of {list(AUTOAUGMENT_POLICIES)}, got {policy!r}")
    return [v2.AutoAugment(AUTOAUGMENT_POLICIES[policy])]


def _randaugment(ctx: PresetContext, num_ops: int = 2, magnitude: int = 9) -> list[Callable]:
    return [v2.RandAugment(num_ops=num_ops, magnitude=magnitude)]


def _trivialaugment(ctx: PresetContext) -> list[Callable]:
    return [v2.TrivialAugmentWide()]


def _random_erasing(
    ctx: PresetContext, p: float = 0.5, scale: Sequence[float] = (0.02, 0.33)
) -> list[Callable]:
    return [v2.RandomErasing(p=p, scale=tuple(scale), value=0)]


def _jpeg(ctx: PresetContext, quality: int | Sequence[int] = (50, 100)) -> list[Callable]:
    ends = [quality, quality] if isinstance(quality, int) else list(quality)
    low, high = ends if len(ends) == 2 else (0, 0)
    if not (isinstance(low, int) and isinstance(high, int) and 1 <= low <= high <= 100):
        raise ValueError(
            f"augment_kwargs.jpeg.quality={quality} is out of range: it must be an integer or "
            "[low, high] with 1 <= low <= high <= 100; e.g. augment_kwargs: {jpeg: {quality: [50, 95]}}"
        )
    # JPEG encodes uint8 only; float images in [0, 1] are quantised first (and stay uint8).
    return [v2.ToDtype(torch.uint8, scale=True), v2.JPEG((low, high))]


def _elastic(ctx: PresetContext, alpha: float = 50.0, sigma: float = 5.0) -> list[Callable]:
    if alpha < 0 or sigma <= 0:
        raise ValueError(
            f"augment_kwargs.elastic needs alpha >= 0 and sigma > 0, got alpha={alpha}, sigma={sigma}; "
            "e.g. augment_kwargs: {elastic: {alpha: 50.0, sigma: 5.0}}"
        )
    # The displacement field is smoothed by a Gaussian of kernel side int(8 * sigma + 1), whose
    # reflect padding must stay below the image side.
    largest = (ctx.size - 1) / 8
    if ctx.check_size and int(8 * sigma + 1) // 2 >= ctx.size:
        raise ValueError(
            f"augment_kwargs.elastic.sigma={sigma} is too large for {ctx.size}x{ctx.size} images: the "
            f"smoothing kernel must fit the image, so sigma must be below about {largest:.2f}; "
            f"e.g. augment_kwargs: {{elastic: {{alpha: {ctx.size / 4:g}, sigma: {largest / 2:.2g}}}}}"
        )
    return [v2.ElasticTransform(alpha=alpha, sigma=sigma)]


def _lens_distortion(
    ctx: PresetContext, k: Sequence[float] = (-0.2, 0.2), padding_mode: str = "reflection"
) -> list[Callable]:
    return [LensDistortion(k, padding_mode)]


def _salt_pepper(ctx: PresetContext, fraction: float = 0.05, salt: float = 0.5) -> list[Callable]:
    return [SaltAndPepper(fraction, salt)]


def _augmix(
    ctx: PresetContext, severity: int = 3, mixture_width: int = 3, chain_depth: int = -1, alpha: float = 1.0
) -> list[Callable]:
    if not 1 <= severity <= 10 or mixture_width < 1 or alpha <= 0:
        raise ValueError(
            f"augment_kwargs.augmix needs severity in [1, 10], mixture_width >= 1 and alpha > 0, got "
            f"severity={severity}, mixture_width={mixture_width}, alpha={alpha}; e.g. the paper's "
            "augment_kwargs: {augmix: {severity: 3, mixture_width: 3, alpha: 1.0}}"
        )
    return [v2.AugMix(severity=severity, mixture_width=mixture_width, chain_depth=chain_depth, alpha=alpha)]


PRESETS: dict[str, Callable[..., list[Callable]]] = {
    "none": lambda ctx: [],
    "flip": _flip,
    "translate": _translate,
    "crop_flip": _crop_flip,
    "resnet_scale": _resnet_scale,
    "inception": _inception,
    "color_jitter": _color_jitter,
    "pca_lighting": _pca_lighting,
    "affine": _affine,
    "noise": _noise,
    "autoaugment": _autoaugment,
    "randaugment": _randaugment,
    "trivialaugment": _trivialaugment,
    "random_erasing": _random_erasing,
    "jpeg": _jpeg,
    "elastic": _elastic,
    "lens_distortion": _lens_distortion,
    "salt_pepper": _salt_pepper,
    "augmix": _augmix,
}
# Presets that produce images of side ``ctx.size`` from inputs of any size.
SIZING_PRESETS = ("resnet_scale", "inception")
BATCH_PRESETS = ("mixup", "cutmix")


def preset_names(names: str | Sequence[str] | None) -> list[str]:
    """Normalise ``None`` / one name / a list to a validated list of preset names."""
    if names is None:
        return []
    names = [names] if isinstance(names, str) else list(names)
    unknown = [name for name in names if name not in PRESETS]
    if unknown:
        raise ValueError(
            f"augment: unknown augmentation preset(s) {unknown}; valid presets are {sorted(PRESETS)}; "
            "fix the name(s) in augment, e.g. augment: [crop_flip, jpeg]"
        )
    return [name for name in names if name != "none"]


def _check_kwargs(
    names: Sequence[str], kwargs: dict[str, dict[str, Any]] | None, valid: Sequence[str]
) -> dict:
    kwargs = dict(kwargs or {})
    stray = [name for name in kwargs if name not in names]
    if stray:
        raise ValueError(
            f"augment_kwargs has entries {stray} for presets that are not selected {list(names)}; "
            f"valid presets are {sorted(valid)}"
        )
    return kwargs


def build_transform(
    names: str | Sequence[str] | None,
    context: PresetContext,
    kwargs: dict[str, dict[str, Any]] | None = None,
) -> v2.Compose:
    """Compose the named per-sample presets in order.

    Args:
        names: Preset name(s) from :data:`PRESETS`.
        context: Sizes and statistics the presets need.
        kwargs: Per-preset keyword overrides, e.g. ``{"random_erasing": {"p": 0.25}}``.

    Raises:
        ValueError: On unknown names or keywords, listing the valid ones.
    """
    names = preset_names(names)
    kwargs = _check_kwargs(names, kwargs, list(PRESETS))
    transforms: list[Callable] = []
    for name in names:
        try:
            transforms += PRESETS[name](context, **kwargs.get(name, {}))
        except TypeError as err:
            raise ValueError(f"bad augment_kwargs for preset {name!r}: {err}") from err
    return v2.Compose(transforms or [v2.Identity()])


class AugMixViews:
    """Hendrycks et al.'s (2020) training input for the Jensen-Shannon consistency loss.

    ``base`` (e.g. crop and flip) is drawn once per image; the result is returned beside two
    independent ``augmented`` (AugMix) draws of it, stacked as ``(3, C, H, W)``. A batch
    ``(N, 3, C, H, W)`` becomes timm's layout ``[clean; view 1; view 2]`` of ``3N`` images on the
    device (:meth:`~lightning_tricks.datamodules.base.PreprocessedImageDataModule.on_after_batch_transfer`).

    Example::

        views = AugMixViews(v2.RandomHorizontalFlip(), v2.AugMix())
        clean, first, second = views(image_uint8_chw)
    """

    num_views = 3

    def __init__(self, base: Callable, augmented: Callable) -> None:
        self.base = base
        self.augmented = augmented

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = self.base(image)
        views = [self.augmented(image) for _ in range(self.num_views - 1)]
        return torch.stack([torch.as_tensor(view) for view in (image, *views)])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base={self.base}, augmented={self.augmented})"


def build_augmix_views(
    names: str | Sequence[str] | None,
    context: PresetContext,
    kwargs: dict[str, dict[str, Any]] | None = None,
) -> AugMixViews:
    """:class:`AugMixViews` of the presets before ``augmix`` (shared) and ``augmix`` (per view).

    Raises:
        ValueError: When ``augmix`` is not the last preset.
    """
    names = preset_names(names)
    if not names or names[-1] != "augmix":
        raise ValueError(
            f"augmix_jsd=True needs augmix as the last preset of augment, got augment={names}; "
            "e.g. augment: [crop_flip, augmix]"
        )
    kwargs = _check_kwargs(names, kwargs, list(PRESETS))
    shared = {name: value for name, value in kwargs.items() if name != "augmix"}
    own = {"augmix": kwargs["augmix"]} if "augmix" in kwargs else None
    return AugMixViews(
        build_transform(names[:-1], context, shared), build_transform(["augmix"], context, own)
    )


class BatchAugment:
    """Batch-level mixup and/or cutmix (torchvision ``v2.MixUp``/``v2.CutMix``) on float images.

    With both names, each batch uses one of them chosen at random (timm's ``switch_prob=0.5``).
    Int64 targets ``(N,)`` become soft float targets ``(N, num_classes)`` that sum to 1.

    Args:
        names: ``"mixup"``, ``"cutmix"`` or both.
        num_classes: Number of classes for the one-hot targets.
        mixup_alpha: Beta(alpha, alpha) parameter of mixup.
        cutmix_alpha: Beta(alpha, alpha) parameter of cutmix.

    Example::

        mix = BatchAugment(["mixup", "cutmix"], num_classes=10)
        images, soft_targets = mix(images_float, labels)
    """

    def __init__(
        self,
        names: str | Sequence[str],
        num_classes: int,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 1.0,
    ) -> None:
        names = [names] if isinstance(names, str) else list(names)
        unknown = [name for name in names if name not in BATCH_PRESETS]
        if unknown or not names:
            raise ValueError(
                f"unknown batch augmentation(s) {unknown or names}; valid are {list(BATCH_PRESETS)}"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 for mixup/cutmix, got {num_classes}")
        for arg, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
            if value <= 0:
                raise ValueError(f"{arg} must be > 0, got {value}")
        self.names = names
        self.num_classes = num_classes
        choices = {
            "mixup": v2.MixUp(alpha=mixup_alpha, num_classes=num_classes),
            "cutmix": v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes),
        }
        selected = [choices[name] for name in names]
        self.transform = selected[0] if len(selected) == 1 else v2.RandomChoice(selected)

    def __call__(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if targets.ndim != 1:
            raise ValueError(
                f"mixup/cutmix need int64 class targets of shape (N,), got {tuple(targets.shape)}"
            )
        images, targets = self.transform(images, targets)
        return images, targets

    def __repr__(self) -> str:
        return f"{type(self).__name__}(names={self.names}, num_classes={self.num_classes})"
