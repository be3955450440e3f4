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
    drop_path_rates,
    is_norm,
    kaiming_init,
    make_drop_block,
    make_drop_path,
    make_norm,
    pooled_classifier_head,
)
from lightning_tricks.recipes.models.registry import register_variant


class PreActBlock(nn.Module):
    """norm-ReLU-conv3x3-norm-ReLU-conv3x3 plus identity (or 1x1 projection of the pre-activated input).

    ``last_norm`` is ``bn2``, the last norm of the residual branch: zeroing its scale (its bias
    starts at zero) makes the branch output zero, so the block starts as the identity. ``drop_path`` is
    the probability of dropping the residual branch (stochastic depth).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm: str,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.drop_path = make_drop_path(drop_path)
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
        return self.drop_path(out) + identity


class _PreActNet(nn.Module):
    """3x3 stem, stages of :class:`PreActBlock`, final norm-ReLU, then pool, dropout and classifier.

    ``stages`` lists ``(width, num_blocks)``; the first stage keeps the resolution and each later
    one halves it. Arguments are validated by the public subclasses, except ``drop_path`` (linear decay
    over all blocks) and ``drop_block`` (after the last two stages), validated here.
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
        drop_path: float = 0.0,
        drop_block: float = 0.0,
        drop_block_size: int = 3,
    ) -> None:
        super().__init__()
        rates = iter(drop_path_rates(drop_path, sum(n for _, n in stages)))
        self.drop_block = make_drop_block(drop_block, drop_block_size)
        self.stem = conv3x3(in_channels, stem_width, bias=norm == "none")
        layers: list[nn.Module] = []
        channels = stem_width
        for i, (width, n) in enumerate(stages):
            blocks = [PreActBlock(channels, width, 1 if i == 0 else 2, norm, block_dropout, next(rates))]
            blocks += [PreActBlock(width, width, 1, norm, block_dropout, next(rates)) for _ in range(n - 1)]
            layers.append(nn.Sequential(*blocks))
            channels = width
        self.layers = nn.Sequential(*layers)
        self.final_norm = make_norm(norm, channels)
        self.pool, self.dropout, self.classifier = pooled_classifier_head(
            channels, num_classes, head_dropout, drop_connect
        )
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, stage in enumerate(self.layers):
            x = stage(x)
            if i >= len(self.layers) - 2:
                x = self.drop_block(x)
        x = F.relu(self.final_norm(x))
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
        drop_path: Stochastic depth rate of the last block, linearly less for earlier ones.
        drop_block: DropBlock probability after the last two stages.
        drop_block_size: DropBlock's square block side.
    """

    def __init__(
        self,
        num_blocks: tuple[int, ...],
        num_classes: int,
        in_channels: int = 3,
        norm: str = "batch",
        dropout: float = 0.0,
        drop_connect: float = 0.0,
        drop_path: float = 0.0,
        drop_block: float = 0.0,
        drop_block_size: int = 3,
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
            drop_path=drop_path,
            drop_block=drop_block,
            drop_block_size=drop_block_size,
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
