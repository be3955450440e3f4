"""CIFAR ResNets of He et al. (2016), "Deep Residual Learning for Image Recognition", section 4.2.

Three stages of 16, 32 and 64 channels on 32x32, 16x16 and 8x8 maps, each of ``n = (depth - 2) / 6``
basic blocks, so depth 20, 32, 44, 56 and 110 give n = 3, 5, 7, 9 and 18.

Example::

    from lightning_tricks.recipes.models import create_model

    net = create_model("resnet56", num_classes=10, shortcut="A")
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
    drop_path_rates,
    is_norm,
    kaiming_init,
    make_drop_block,
    make_drop_path,
    make_norm,
    pooled_classifier_head,
)
from lightning_tricks.recipes.models.registry import register_variant

SHORTCUTS: tuple[str, ...] = ("A", "B")


class PadShortcut(nn.Module):
    """Option A shortcut: parameter-free strided identity, new channels zero-padded on both sides."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(f"option A cannot reduce channels ({in_channels} -> {out_channels})")
        self.stride = stride
        self.pad_before = (out_channels - in_channels) // 2
        self.pad_after = out_channels - in_channels - self.pad_before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_before, self.pad_after))


class BasicBlock(nn.Module):
    """conv3x3-norm-ReLU-conv3x3-norm plus shortcut, then ReLU (post-activation).

    ``last_norm`` is the norm ending the residual branch (``None`` without normalisation), the
    layer whose scale is zero-initialised by Goyal et al. (2017). ``drop_path`` is the probability of
    dropping the residual branch (stochastic depth).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm: str,
        shortcut: str,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__()
        self.drop_path = make_drop_path(drop_path)
        bias = norm == "none"
        self.conv1 = conv3x3(in_channels, out_channels, stride, bias=bias)
        self.bn1 = make_norm(norm, out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, bias=bias)
        self.bn2 = make_norm(norm, out_channels)
        self.last_norm: nn.Module | None = self.bn2 if is_norm(self.bn2) else None
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            if shortcut == "A":
                self.shortcut = PadShortcut(in_channels, out_channels, stride)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=bias),
                    make_norm(norm, out_channels),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(self.drop_path(out) + self.shortcut(x), inplace=True)


class CifarResNet(nn.Module):
    """ResNet for 32x32 inputs: 3x3 stem, three stages of basic blocks, global pool, linear head.

    Args:
        depth: total weighted layers; ``(depth - 2) % 6 == 0``.
        num_classes: number of output logits.
        in_channels: image channels.
        norm: ``"batch"``, ``"group"``, ``"layer"`` or ``"none"``.
        shortcut: ``"A"`` (zero-padded identity, as in the paper's CIFAR experiments) or ``"B"``
            (1x1 projection when the shape changes).
        dropout: dropout probability before the classifier.
        drop_connect: DropConnect probability on the classifier weights.
        drop_path: Stochastic depth: the last block's residual branch is dropped with this probability,
            earlier ones linearly less (:func:`~lightning_tricks.recipes.models.layers.drop_path_rates`).
        drop_block: DropBlock probability after the last two stages (Ghiasi et al. 2018 use ~0.1).
        drop_block_size: DropBlock's square block side (7 on ImageNet's 14x14/7x7 maps; 3 suits CIFAR).
    """

    def __init__(
        self,
        depth: int,
        num_classes: int,
        in_channels: int = 3,
        norm: str = "batch",
        shortcut: str = "A",
        dropout: float = 0.0,
        drop_connect: float = 0.0,
        drop_path: float = 0.0,
        drop_block: float = 0.0,
        drop_block_size: int = 3,
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"depth must be 6n + 2 with n >= 1 (20, 32, 44, 56, 110, ...), got {depth}")
        check_choice("norm", norm, CONV_NORMS)
        check_choice("shortcut", shortcut, SHORTCUTS)
        check_probability("dropout", dropout)
        n = (depth - 2) // 6
        rates = iter(drop_path_rates(drop_path, 3 * n))
        self.drop_block = make_drop_block(drop_block, drop_block_size)
        self.stem = nn.Sequential(
            conv3x3(in_channels, 16, bias=norm == "none"), make_norm(norm, 16), nn.ReLU(inplace=True)
        )
        stages: list[nn.Module] = []
        channels = 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for i in range(n):
                stride_i = stride if i == 0 else 1
                blocks.append(BasicBlock(channels, width, stride_i, norm, shortcut, next(rates)))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool, self.dropout, self.classifier = pooled_classifier_head(
            channels, num_classes, dropout, drop_connect
        )
        kaiming_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop_block(self.layer2(self.layer1(self.stem(x))))
        x = self.drop_block(self.layer3(x))
        return self.classifier(self.dropout(self.pool(x)))


for _depth in (20, 32, 44, 56, 110):
    register_variant(
        f"resnet{_depth}",
        CifarResNet,
        depth=_depth,
        input_sizes=(32,),
        doc=f"""CIFAR ResNet-{_depth} (He et al. 2016); see :class:`CifarResNet` for the arguments.

    Example::

        create_model("resnet{_depth}", num_classes=10, shortcut="A")
    """,
    )
