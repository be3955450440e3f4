"""Pre-activation ResNet-18 of He et al. (2016), "Identity Mappings in Deep Residual Networks".

CIFAR variant: 3x3 stem without max-pool, four stages of 64, 128, 256 and 512 channels.

Example::

    from lightning_tricks.recipes.models import create_model

    net = create_model("preact_resnet18", num_classes=10, norm="group")
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tricks.recipes.models.layers import (
    CONV_NORMS,
    check_choice,
    check_probability,
    conv3x3,
    is_norm,
    kaiming_init,
    make_classifier,
    make_norm,
)
from lightning_tricks.recipes.models.registry import register_model


class PreActBlock(nn.Module):
    """norm-ReLU-conv3x3-norm-ReLU-conv3x3 plus identity (or 1x1 projection of the pre-activated input).

    ``last_norm`` is ``bn2``, the last norm of the residual branch: zeroing its scale (its bias
    starts at zero) makes the branch output zero, so the block starts as the identity.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: str, dropout: float = 0.0):
        super().__init__()
        bias = norm == "none"
        self.bn1 = make_norm(norm, in_channels)
        self.conv1 = conv3x3(in_channels, out_channels, stride, bias=bias)
        self.bn2 = make_norm(norm, out_channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = conv3x3(out_channels, out_channels, bias=bias)
        self.last_norm: nn.Module | None = self.bn2 if is_norm(self.bn2) else None
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        identity = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + identity


class PreActResNet(nn.Module):
    """Pre-activation ResNet with a CIFAR stem.

    Args:
        num_blocks: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
        num_classes: number of output logits.
        in_channels: image channels.
        norm: ``"batch"``, ``"group"``, ``"layer"`` or ``"none"``.
        dropout: dropout probability before the classifier.
        drop_connect: DropConnect probability on the classifier weights.
    """

    def __init__(
        self,
        num_blocks: tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
        norm: str = "batch",
        dropout: float = 0.0,
        drop_connect: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice("norm", norm, CONV_NORMS)
        check_probability("dropout", dropout)
        self.stem = conv3x3(in_channels, 64, bias=norm == "none")
        stages: list[nn.Module] = []
        channels = 64
        for i, n in enumerate(num_blocks):
            width = 64 * 2**i
            blocks = [PreActBlock(channels, width, 1 if i == 0 else 2, norm)]
            blocks += [PreActBlock(width, width, 1, norm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.layers = nn.Sequential(*stages)
        self.final_norm = make_norm(norm, channels)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        self.classifier = make_classifier(channels, num_classes, drop_connect)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.final_norm(self.layers(self.stem(x))))
        return self.classifier(self.dropout(self.pool(x)))


@register_model("preact_resnet18", input_sizes=(32,))
def preact_resnet18(
    num_classes: int,
    in_channels: int = 3,
    norm: str = "batch",
    dropout: float = 0.0,
    drop_connect: float = 0.0,
) -> PreActResNet:
    """Pre-activation ResNet-18 for 32x32 images (see :class:`PreActResNet`).

    Example::

        create_model("preact_resnet18", num_classes=100, dropout=0.2)
    """
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, norm, dropout, drop_connect)
