"""Pre-activation ResNet-18 of He et al. (2016), "Identity Mappings in Deep Residual Networks".

CIFAR variant: 3x3 stem without max-pool, four stages of 64, 128, 256 and 512 channels.

Example::

    from lightning_tricks.recipes.models import create_model

    net = create_model("preact_resnet18", num_classes=10, norm="group")
"""

from __future__ import annotations

from collections.abc import Sequence

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
    make_norm,
    pooled_classifier_head,
)
from lightning_tricks.recipes.models.registry import register_variant


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


class _PreActNet(nn.Module):
    """3x3 stem, stages of :class:`PreActBlock`, final norm-ReLU, then pool, dropout and classifier.

    ``stages`` lists ``(width, num_blocks)``; the first stage keeps the resolution and each later
    one halves it. Arguments are validated by the public subclasses.
    """

    def __init__(
        self,
        *,
        in_channels: int,
        stem_width: int,
        stages: Sequence[tuple[int, int]],
        norm: str,
        block_dropout: float,
        num_classes: int,
        head_dropout: float,
        drop_connect: float,
    ) -> None:
        super().__init__()
        self.stem = conv3x3(in_channels, stem_width, bias=norm == "none")
        layers: list[nn.Module] = []
        channels = stem_width
        for i, (width, n) in enumerate(stages):
            blocks = [PreActBlock(channels, width, 1 if i == 0 else 2, norm, block_dropout)]
            blocks += [PreActBlock(width, width, 1, norm, block_dropout) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            channels = width
        self.layers = nn.Sequential(*layers)
        self.final_norm = make_norm(norm, channels)
        self.pool, self.dropout, self.classifier = pooled_classifier_head(
            channels, num_classes, head_dropout, drop_connect
        )
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.final_norm(self.layers(self.stem(x))))
        return self.classifier(self.dropout(self.pool(x)))


class PreActResNet(_PreActNet):
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
        check_choice("norm", norm, CONV_NORMS)
        check_probability("dropout", dropout)
        super().__init__(
            in_channels=in_channels,
            stem_width=64,
            stages=[(64 * 2**i, n) for i, n in enumerate(num_blocks)],
            norm=norm,
            block_dropout=0.0,
            num_classes=num_classes,
            head_dropout=dropout,
            drop_connect=drop_connect,
        )


preact_resnet18 = register_variant(
    "preact_resnet18",
    PreActResNet,
    num_blocks=(2, 2, 2, 2),
    input_sizes=(32,),
    doc="""Pre-activation ResNet-18 for 32x32 images (see :class:`PreActResNet`).

    Example::

        create_model("preact_resnet18", num_classes=100, dropout=0.2)
    """,
)
