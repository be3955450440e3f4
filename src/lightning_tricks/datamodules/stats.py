"""Statistics of the training split, computed once and applied identically to every split.

The lectures' rule: compute preprocessing statistics (mean, std, mean image, whitening, colour
PCA) on the training data only, save them with the run and apply exactly those to validation and
test data. :class:`ImageStatistics` holds them as plain tensors, so they travel in the
DataModule's ``state_dict`` (and hence in every Lightning checkpoint) and in a small cache file.

Example::

    mean, std = channel_mean_std(train_images)  # (C,) each, from uint8 or float images

    stats = ImageStatistics(whitening="zca")
    stats.fit(train_images)                    # (N, C, H, W) uint8 or float in [0, 1]
    inputs = stats.apply(batch)                # standardised + ZCA-whitened float32
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from typing import Any

import torch

from lightning_tricks._io import atomic_save

WHITENING_MODES = ("zca", "pca")
#: Smallest divisor of ``std_image``: one 8-bit intensity level. A pixel that varies less over the
#: training set (a border that is always black) carries no usable variation; dividing by its tiny std
#: would blow up quantisation noise and any test value it never showed in training.
STD_IMAGE_FLOOR = 1.0 / 255.0


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] or float images in [0, 1] -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def channel_mean_std(images: torch.Tensor, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and (population) standard deviation of ``(N, C, H, W)`` images in [0, 1] units.

    Accumulates sums in float64 over chunks, so uint8 datasets never need a full float copy.
    """
    moments = _moments_of(images, chunk_size)
    return moments.mean().float(), moments.std().float()


def pixel_pca(images: torch.Tensor, chunk_size: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``(C,)`` and eigenvectors ``(C, C)`` (columns) of the pixel colour covariance.

    This is AlexNet's colour PCA: every pixel of every training image is one ``C``-vector in [0, 1]
    units. Eigenvalues are sorted in descending order.
    """
    return _eigh_desc(_moments_of(images, chunk_size).covariance())


def fingerprint(**parts: Any) -> str:
    """Stable SHA-1 of JSON-serialisable parts (file lists, sizes, seeds, options)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()


def tensor_fingerprint(tensor: torch.Tensor) -> str:
    """SHA-1 of a tensor's bytes, shape and dtype (the identity of an in-memory split)."""
    digest = hashlib.sha1(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    digest.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _eigh_desc(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    eigval, eigvec = torch.linalg.eigh(cov)
    order = eigval.argsort(descending=True)
    return eigval[order].clamp_min(0.0).float(), eigvec[:, order].float()


class _ChannelMoments:
    """Streaming per-channel sums and colour cross-products in float64."""

    def __init__(self, channels: int) -> None:
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.outer = torch.zeros(channels, channels, dtype=torch.float64)
        self.count = 0

    def update(self, images: torch.Tensor) -> None:
        pixels = to_unit_float(images).double().transpose(0, 1).reshape(images.shape[1], -1)
        self.sum += pixels.sum(dim=1)
        self.outer += pixels @ pixels.T
        self.count += pixels.shape[1]

    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    def covariance(self) -> torch.Tensor:
        mean = self.mean()
        return self.outer / self.count - torch.outer(mean, mean)

    def std(self) -> torch.Tensor:
        return self.covariance().diagonal().clamp_min(0.0).sqrt()


def _moments_of(images: torch.Tensor, chunk_size: int) -> _ChannelMoments:
    """Channel moments of ``(N, C, H, W)`` images, accumulated in chunks (no full float copy)."""
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    moments = _ChannelMoments(images.shape[1])
    for start in range(0, images.shape[0], chunk_size):
        moments.update(images[start : start + chunk_size])
    return moments


class ImageStatistics:
    """Preprocessing fitted on the training split and applied to every batch of every split.

    ``apply`` maps uint8 images (or float images in [0, 1]) to ``(x - mean) / std`` per channel;
    with ``mean_image=True`` (or any whitening) the per-pixel mean image is subtracted instead of
    the per-channel mean, and ``std_image=True`` standardises each pixel, ``(x - mean image) / std image``
    (each pixel's mean and std over the training images), instead of each channel;
    ``whitening="zca"`` multiplies the flattened standardised image by
    ``U diag(1 / sqrt(lambda + eps)) U^T`` (``"pca"`` by ``diag(1 / sqrt(lambda + eps)) U^T``),
    where ``U, lambda`` are the eigenvectors/eigenvalues of the standardised training covariance.
    The colour PCA (``eigval``, ``eigvec``) used by the ``pca_lighting`` preset is always fitted.

    What ``eps`` does: the whitened training data has covariance
    ``U diag(lambda / (lambda + eps)) U^T``, i.e. eigenvalues ``lambda / (lambda + eps)`` instead of 1.
    Directions with ``lambda >> eps`` are whitened (eigenvalue near 1); those with ``lambda << eps``
    (fine detail and noise, most directions of natural images) are left nearly unscaled
    (``~ lambda / eps``), so the default ``eps=1e-2`` on standardised data (total variance ``C*H*W``)
    whitens only partly; ``eps -> 0`` whitens fully and amplifies noise.

    Args:
        normalize: Divide by the training std (and centre): per channel, or per pixel with
            ``std_image``.
        mean_image: Subtract the training mean image (fixed-size data only).
        std_image: Standardise per pixel: subtract the training mean image and divide by the training
            std image ``(C, H, W)`` instead of the per-channel std (fixed-size data only; needs
            ``normalize``). The std is floored at :data:`STD_IMAGE_FLOOR` (one 8-bit level).
        whitening: ``None``, ``"zca"`` or ``"pca"`` (small fixed-size images: the matrix is
            ``(C*H*W)^2``).
        eps: Added to the whitening eigenvalues; the whitened covariance has eigenvalues
            ``lambda / (lambda + eps)``, so larger values whiten less.
        whitening_samples: Training images used for the whitening covariance (seeded subset).

    Example::

        stats = ImageStatistics(mean_image=True)
        stats.fit(train_uint8)                      # (N, C, H, W)
        torch.save(stats.state_dict(), "stats.pt")  # plain tensors, weights_only-loadable
    """

    def __init__(
        self,
        normalize: bool = True,
        mean_image: bool = False,
        whitening: str | None = None,
        eps: float = 1e-2,
        whitening_samples: int = 10_000,
        std_image: bool = False,
    ) -> None:
        if whitening is not None and whitening not in WHITENING_MODES:
            raise ValueError(f"whitening must be None or one of {WHITENING_MODES}, got {whitening!r}")
        if eps <= 0:
            raise ValueError(f"whitening eps must be > 0, got {eps}")
        if std_image and not normalize:
            raise ValueError(
                "std_image=True divides by the per-pixel training std, which normalize=False switches off; "
                "set normalize=True, or std_image=False"
            )
        if whitening_samples < 2:
            raise ValueError(f"whitening_samples must be >= 2, got {whitening_samples}")
        self.normalize = normalize
        self.mean_image = mean_image
        self.std_image = std_image
        self.whitening = whitening
        self.eps = eps
        self.whitening_samples = whitening_samples
        self.tensors: dict[str, torch.Tensor] = {}
        # Device copies used by apply(), so a batch never pays a host-to-device copy of the
        # statistics (36 MB for CIFAR's whitening matrix); keyed to the source tensor's identity.
        self._device_copies: dict[tuple[str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}

    def _on(self, name: str, device: torch.device) -> torch.Tensor:
        source = self.tensors[name]
        if source.device == device:
            return source
        cached = self._device_copies.get((name, device))
        if cached is None or cached[0] is not source:
            cached = (source, source.to(device))
            self._device_copies[(name, device)] = cached
        return cached[1]

    def options(self) -> dict[str, Any]:
        """The settings that change the fitted values (part of a cache fingerprint)."""
        return {
            "normalize": self.normalize,
            "mean_image": self.mean_image,
            "std_image": self.std_image,
            "whitening": self.whitening,
            "eps": self.eps,
            "whitening_samples": self.whitening_samples,
        }

    @property
    def fitted(self) -> bool:
        return "mean" in self.tensors

    @property
    def mean(self) -> torch.Tensor | None:
        """Per-channel mean ``(C,)`` in [0, 1] units."""
        return self.tensors.get("mean")

    @property
    def std(self) -> torch.Tensor | None:
        """Per-channel population std ``(C,)`` in [0, 1] units."""
        return self.tensors.get("std")

    @property
    def image_mean(self) -> torch.Tensor | None:
        """Per-pixel mean image ``(C, H, W)`` (fixed-size data only)."""
        return self.tensors.get("image_mean")

    @property
    def image_std(self) -> torch.Tensor | None:
        """Per-pixel population std image ``(C, H, W)`` (fitted with ``std_image`` on fixed-size data)."""
        return self.tensors.get("image_std")

    @property
    def whitening_matrix(self) -> torch.Tensor | None:
        """``(C*H*W, C*H*W)`` whitening matrix applied to flattened standardised images."""
        return self.tensors.get("whitening_matrix")

    @property
    def eigval(self) -> torch.Tensor | None:
        """Colour PCA eigenvalues ``(C,)``, descending."""
        return self.tensors.get("eigval")

    @property
    def eigvec(self) -> torch.Tensor | None:
        """Colour PCA eigenvectors ``(C, C)`` as columns."""
        return self.tensors.get("eigvec")

    def fit(self, images: torch.Tensor, seed: int = 0, chunk_size: int = 2048) -> ImageStatistics:
        """Fit on an in-memory ``(N, C, H, W)`` training tensor (uint8, or float in [0, 1])."""
        if images.ndim != 4:
            raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
        needs_image_mean = self.mean_image or self.std_image or self.whitening is not None
        self.fit_stream(
            (images[s : s + chunk_size] for s in range(0, images.shape[0], chunk_size)),
            fixed_size=needs_image_mean,
        )
        if self.whitening is not None:
            generator = torch.Generator().manual_seed(seed)
            idx = torch.randperm(images.shape[0], generator=generator)[: self.whitening_samples]
            self.tensors["whitening_matrix"] = self._whitening_matrix(images[idx.sort().values])
        return self

    def fit_stream(self, batches: Iterable[torch.Tensor], fixed_size: bool = False) -> ImageStatistics:
        """Fit mean/std/colour PCA from a stream of ``(B, C, H, W)`` batches (any sizes per batch).

        With ``fixed_size=True`` (all batches of one shape) the per-pixel mean image is fitted too, and
        with ``std_image`` the per-pixel std image.
        Whitening needs :meth:`fit` (it keeps a covariance over whole images).
        """
        moments: _ChannelMoments | None = None
        image_sum: torch.Tensor | None = None
        image_squares: torch.Tensor | None = None
        count = 0
        for batch in batches:
            if moments is None:
                moments = _ChannelMoments(batch.shape[1])
            moments.update(batch)
            if fixed_size:
                pixels = to_unit_float(batch).double()
                summed = pixels.sum(dim=0)
                image_sum = summed if image_sum is None else image_sum + summed
                if self.std_image:
                    squared = pixels.square().sum(dim=0)
                    image_squares = squared if image_squares is None else image_squares + squared
            count += batch.shape[0]
        if moments is None or count == 0:
            raise ValueError("cannot fit statistics on an empty training split")
        cov = moments.covariance()
        self.tensors = {
            "mean": moments.mean().float(),
            "std": moments.std().float(),
        }
        self.tensors["eigval"], self.tensors["eigvec"] = _eigh_desc(cov)
        if image_sum is not None:
            image_mean = image_sum / count
            self.tensors["image_mean"] = image_mean.float()
            if image_squares is not None:
                variance = (image_squares / count - image_mean.square()).clamp_min(0.0)
                self.tensors["image_std"] = variance.sqrt().float()
        return self

    def _whitening_matrix(self, images: torch.Tensor) -> torch.Tensor:
        """Whitening matrix of the standardised images (centred by the mean image)."""
        dims = images[0].numel()
        image_mean = self.tensors["image_mean"].reshape(-1).double()
        scale = self._std_image(images.shape[1:]).reshape(-1).double()
        # Float32 products on data centred with the fitted mean keep precision; sums stay float64.
        cross = torch.zeros(dims, dims, dtype=torch.float64)
        for start in range(0, images.shape[0], 1024):
            chunk = to_unit_float(images[start : start + 1024]).reshape(-1, dims)
            z = (chunk - image_mean.float()) / scale.float()
            cross += (z.T @ z).double()
        cov = cross / images.shape[0]
        eigval, eigvec = torch.linalg.eigh(cov)
        inv_sqrt = (eigval.clamp_min(0.0) + self.eps).rsqrt()
        if self.whitening == "zca":
            return ((eigvec * inv_sqrt) @ eigvec.T).float()
        order = eigval.argsort(descending=True)
        return (inv_sqrt[order, None] * eigvec[:, order].T).float()

    def _std_image(self, shape: torch.Size) -> torch.Tensor:
        if not self.normalize:
            return torch.ones(shape)
        if self.std_image:
            return self.tensors["image_std"].clamp_min(STD_IMAGE_FLOOR)
        return self.tensors["std"].clamp_min(1e-6).view(-1, 1, 1).expand(shape)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 / [0, 1] float ``(N, C, H, W)`` -> preprocessed float32 on the images' device."""
        images = to_unit_float(images)
        if not (self.normalize or self.mean_image or self.whitening):
            return images
        if not self.fitted:
            raise RuntimeError(
                "normalisation statistics are missing: call setup() or load a checkpoint first"
            )
        device = images.device
        if self.mean_image or self.std_image or self.whitening is not None:
            image_mean = self.tensors.get("image_mean")
            if image_mean is None or image_mean.shape != images.shape[1:]:
                got = None if image_mean is None else tuple(image_mean.shape)
                raise RuntimeError(
                    f"mean image of shape {got} cannot be applied to images of shape "
                    f"{tuple(images.shape[1:])}; mean_image/std_image/whitening need fixed-size images"
                )
            images = images - self._on("image_mean", device)
        else:
            images = images - self._on("mean", device).view(1, -1, 1, 1)
        if self.normalize and self.std_image:
            image_std = self.tensors.get("image_std")
            if image_std is None or image_std.shape != images.shape[1:]:
                got = None if image_std is None else tuple(image_std.shape)
                raise RuntimeError(
                    f"std image of shape {got} cannot be applied to images of shape "
                    f"{tuple(images.shape[1:])}; std_image needs fixed-size images"
                )
            images = images / self._on("image_std", device).clamp_min(STD_IMAGE_FLOOR)
        elif self.normalize:
            images = images / self._on("std", device).clamp_min(1e-6).view(1, -1, 1, 1)
        if self.whitening is not None:
            matrix = self._on("whitening_matrix", device)
            images = (images.flatten(1) @ matrix.T).view_as(images)
        return images

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: value.clone() for name, value in self.tensors.items()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tensors = {
            name: torch.as_tensor(value, dtype=torch.float32)
            for name, value in state_dict.items()
            if isinstance(value, torch.Tensor)
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the fitted tensors atomically (a reader never sees a half-written file)."""
        atomic_save(self.state_dict(), path)

    def load(self, path: str | os.PathLike) -> None:
        self.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
