"""The airbench-style CIFAR network (Jordan, 2024): a fast 3-block CNN for small images.

Its parts, each of which speeds up early training:

* a **patch-whitening first layer**: a ``k x k`` convolution whose filters are the eigenvectors of
  the training patches' covariance, scaled by ``1 / sqrt(eigenvalue + eps)``, together with their
  negatives (so the following GELU keeps both signs); the filters are frozen, the bias trains.
  Call :meth:`AirbenchNet.init_whitening` with a batch of preprocessed training images before
  training (:class:`~lightning_tricks.recipes.classifier.ImageClassifier` does it on the first
  training batch);
* **identity-initialised convolutions**: the first ``in_channels`` filters of every 3x3 convolution
  start as a Dirac delta (``torch.nn.init.dirac_``), an implicit residual connection;
* **BatchNorm without learned scale**: the affine weight stays 1 (frozen), only the bias trains,
  with a high running-statistics momentum;
* a bias-free linear head whose logits are scaled down by a constant (``logit_scale``).

Example::

    from lightning_tricks.recipes.models import create_model

    net = create_model("airbench", num_classes=10)
    net.init_whitening(normalized_train_images[:5000])
    logits = net(batch)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from lightning_tricks.recipes.models.registry import register_model


def image_patches(images: Tensor, size: int) -> Tensor:
    """Every ``size x size`` patch (stride 1, no padding) of ``(N, C, H, W)`` images as rows
    ``(N * (H - size + 1) * (W - size + 1), C * size * size)`` in ``(c, y, x)`` order.

    Example::

        image_patches(torch.rand(8, 3, 32, 32), 2).shape  # (8 * 31 * 31, 12)
    """
    if images.ndim != 4:
        raise ValueError(f"images must have shape (N, C, H, W), got {tuple(images.shape)}")
    channels = images.shape[1]
    windows = images.unfold(2, size, 1).unfold(3, size, 1)  # (N, C, H', W', size, size)
    return windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, channels * size * size)


def whitening_filters(images: Tensor, size: int, eps: float = 5e-4) -> Tensor:
    """Patch-whitening filters ``(2 * C * size**2, C, size, size)`` computed from ``images``.

    The second moment ``P^T P / n`` of the patches ``P`` (uncentred: the images are already
    normalised) is eigendecomposed; filter ``i`` is eigenvector ``i`` (eigenvalues descending) divided
    by ``sqrt(eigenvalue_i + eps)``, and the filters are followed by their negatives. Computed in
    float64 (the matrix is tiny) and returned in the images' dtype.
    """
    if eps <= 0:
        raise ValueError(f"whitening eps must be > 0, got {eps}")
    patches = image_patches(images.detach(), size).double()
    moment = patches.T @ patches / len(patches)
    eigenvalues, eigenvectors = torch.linalg.eigh(moment)  # ascending
    eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
    filters = (eigenvectors / torch.sqrt(eigenvalues.clamp_min(0) + eps)).T
    filters = filters.reshape(-1, images.shape[1], size, size)
    return torch.cat([filters, -filters]).to(images.dtype)


class _ConvBlock(nn.Module):
    """conv3x3 -> maxpool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU (airbench's ``ConvGroup``)."""

    def __init__(self, channels_in: int, channels_out: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = _dirac_conv(channels_in, channels_out)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _scale_free_batchnorm(channels_out, bn_momentum)
        self.conv2 = _dirac_conv(channels_out, channels_out)
        self.norm2 = _scale_free_batchnorm(channels_out, bn_momentum)
        self.act = nn.GELU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


def _dirac_conv(channels_in: int, channels_out: int) -> nn.Conv2d:
    conv = nn.Conv2d(channels_in, channels_out, 3, padding="same", bias=False)
    with torch.no_grad():
        # Identity on the first min(in, out) output channels: an implicit residual at init.
        nn.init.dirac_(conv.weight[: min(channels_in, channels_out)])
    return conv


def _scale_free_batchnorm(channels: int, momentum: float) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=momentum)
    norm.weight.requires_grad_(False)  # scale fixed at 1: the following conv rescales anyway
    return norm


class AirbenchNet(nn.Module):
    """Whitening conv -> GELU -> three conv blocks -> global max pool -> linear head -> ``* logit_scale``.

    Args:
        num_classes: Output classes.
        in_channels: Image channels.
        widths: Channels of the three blocks (airbench94: 64, 256, 256).
        whitening_size: Kernel side of the whitening layer; it has ``2 * in_channels * size**2``
            output channels.
        whitening_eps: Added to the patch eigenvalues before the inverse square root.
        bn_momentum: Running-statistics momentum in PyTorch's convention (airbench's 0.6 decay is 0.4).
        logit_scale: Constant multiplying the logits (airbench: 1/9).
        whitening_bias_epochs: Train the whitening layer's bias for this many epochs, then freeze it
            (airbench94: 3, "it trains quickly"); ``None`` trains it throughout.
            :meth:`set_training_epoch` applies it (``ImageClassifier`` calls it at every epoch start
            and when a run starts or resumes). A frozen bias gets no
            gradient, so the optimizer leaves it alone (weight decay included), as in airbench.
        whitening: ``False`` makes the first layer a plain trainable convolution of the same shape
            (PyTorch's default init, no :meth:`init_whitening`), to measure what the whitening is worth.

    Example::

        net = AirbenchNet(num_classes=10)
        net.init_whitening(images)  # normalised training images, (N, 3, 32, 32)
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 256, 256),
        whitening_size: int = 2,
        whitening_eps: float = 5e-4,
        bn_momentum: float = 0.4,
        logit_scale: float = 1 / 9,
        whitening_bias_epochs: int | None = None,
        whitening: bool = True,
    ) -> None:
        super().__init__()
        if whitening_bias_epochs is not None and (
            isinstance(whitening_bias_epochs, bool)
            or not isinstance(whitening_bias_epochs, int)
            or whitening_bias_epochs < 0
        ):
            raise ValueError(
                "model_kwargs.whitening_bias_epochs must be None (always trained) or an int >= 0, "
                f"got {whitening_bias_epochs!r}; airbench94 uses 3"
            )
        self.whitening_bias_epochs = whitening_bias_epochs
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths must be three positive channel counts, got {list(widths)}")
        if whitening_size < 1:
            raise ValueError(f"whitening_size must be >= 1, got {whitening_size}")
        if not 0 < bn_momentum <= 1:
            raise ValueError(f"bn_momentum must be in (0, 1], got {bn_momentum}")
        whiten_width = 2 * in_channels * whitening_size**2
        self.whitening_eps = whitening_eps
        self.whitening = whitening
        self.whiten = nn.Conv2d(in_channels, whiten_width, whitening_size, padding=0, bias=True)
        if whitening:
            self.whiten.weight.requires_grad_(False)
            nn.init.zeros_(self.whiten.bias)
        self.register_buffer("whitening_initialized", torch.tensor(False))
        self.act = nn.GELU()
        channels = (whiten_width, *widths)
        self.blocks = nn.Sequential(
            *(_ConvBlock(channels[i], channels[i + 1], bn_momentum) for i in range(3))
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    @torch.no_grad()
    def init_whitening(self, images: Tensor) -> None:
        """Set the whitening filters from preprocessed training images ``(N, C, H, W)``."""
        if not self.whitening:
            raise ValueError(
                "init_whitening needs whitening=True; this network's first layer is a plain conv"
            )
        weight = self.whiten.weight
        if images.ndim != 4 or images.shape[1] != weight.shape[1]:
            expected = f"(N, {weight.shape[1]}, H, W)"
            raise ValueError(f"init_whitening needs images of shape {expected}, got {tuple(images.shape)}")
        images = images.to(weight.device, torch.float32)
        filters = whitening_filters(images, weight.shape[-1], self.whitening_eps)
        weight.copy_(filters)
        self.whitening_initialized.fill_(True)

    def set_training_epoch(self, epoch: int) -> None:
        """Freeze the whitening bias from epoch ``whitening_bias_epochs`` on (zero-based epochs)."""
        if self.whitening_bias_epochs is not None:
            self.whiten.bias.requires_grad_(epoch < self.whitening_bias_epochs)

    def forward(self, x: Tensor) -> Tensor:
        x = self.blocks(self.act(self.whiten(x)))
        return self.classifier(self.pool(x).flatten(1)) * self.logit_scale


register_model("airbench")(AirbenchNet)
