"""Wide residual networks of Zagoruyko & Komodakis (2016), "Wide Residual Networks".

WRN-d-k: a 3x3 stem of 16 channels and three stages of ``n = (d - 4) / 6`` pre-activation blocks
with 16k, 32k and 64k channels; dropout sits between the two convolutions of every block.

Example::

    from lightning_tricks.recipes.models import create_model

    net = create_model("wide_resnet", num_classes=10, depth=16, widen_factor=4, dropout=0.3)
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
    kaiming_init,
    make_classifier,
    make_norm,
)
from lightning_tricks.recipes.models.preact_resnet import PreActBlock
from lightning_tricks.recipes.models.registry import register_model


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for 32x32 inputs.

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        depth: total depth; ``(depth - 4) % 6 == 0``, e.g. 16, 22, 28, 40.
        widen_factor: channel multiplier k.
        dropout: dropout probability between the convolutions of each block (as in the paper).
        head_dropout: dropout probability before the classifier.
        drop_connect: DropConnect probability on the classifier weights.
        norm: ``"batch"``, ``"group"``, ``"layer"`` or ``"none"``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        depth: int = 28,
        widen_factor: int = 10,
        dropout: float = 0.0,
        head_dropout: float = 0.0,
        drop_connect: float = 0.0,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"depth must satisfy (depth - 4) % 6 == 0 with depth >= 10, got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        check_choice("norm", norm, CONV_NORMS)
        check_probability("dropout", dropout)
        check_probability("head_dropout", head_dropout)
        n = (depth - 4) // 6
        self.stem = conv3x3(in_channels, 16, bias=norm == "none")
        stages: list[nn.Module] = []
        channels = 16
        for i, width in enumerate((16 * widen_factor, 32 * widen_factor, 64 * widen_factor)):
            blocks = [PreActBlock(channels, width, 1 if i == 0 else 2, norm, dropout)]
            blocks += [PreActBlock(width, width, 1, norm, dropout) for _ in range(n - 1)]
            stages.append(nn.Sequential(*blocks))
            channels = width
        self.layers = nn.Sequential(*stages)
        self.final_norm = make_norm(norm, channels)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(head_dropout)
        self.classifier = make_classifier(channels, num_classes, drop_connect)
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.final_norm(self.layers(self.stem(x))))
        return self.classifier(self.dropout(self.pool(x)))


@register_model("wide_resnet", input_sizes=(32,))
def wide_resnet(
    num_classes: int,
    in_channels: int = 3,
    depth: int = 28,
    widen_factor: int = 10,
    dropout: float = 0.0,
    head_dropout: float = 0.0,
    drop_connect: float = 0.0,
    norm: str = "batch",
) -> WideResNet:
    """WRN-``depth``-``widen_factor`` (see :class:`WideResNet`); ``dropout`` acts inside the blocks.

    Example::

        create_model("wide_resnet", num_classes=100, depth=40, widen_factor=4, dropout=0.3)
    """
    return WideResNet(
        num_classes, in_channels, depth, widen_factor, dropout, head_dropout, drop_connect, norm
    )


@register_model("wrn_28_10", input_sizes=(32,))
def wrn_28_10(
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    head_dropout: float = 0.0,
    drop_connect: float = 0.0,
    norm: str = "batch",
) -> WideResNet:
    """WRN-28-10 (36.5M parameters); the paper trains it with ``dropout=0.3``.

    Example::

        create_model("wrn_28_10", num_classes=10, dropout=0.3)
    """
    return WideResNet(num_classes, in_channels, 28, 10, dropout, head_dropout, drop_connect, norm)


@register_model("wrn_16_8", input_sizes=(32,))
def wrn_16_8(
    num_classes: int,
    in_channels: int = 3,
    dropout: float = 0.0,
    head_dropout: float = 0.0,
    drop_connect: float = 0.0,
    norm: str = "batch",
) -> WideResNet:
    """WRN-16-8 (11M parameters).

    Example::

        create_model("wrn_16_8", num_classes=10, dropout=0.3)
    """
    return WideResNet(num_classes, in_channels, 16, 8, dropout, head_dropout, drop_connect, norm)
