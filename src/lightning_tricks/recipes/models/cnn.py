"""A small plain convolutional network for any input of at least 8x8 pixels.

Example::

    from lightning_tricks.recipes.models import create_model

    net = create_model("small_cnn", num_classes=10, in_channels=1, widths=(16, 32, 64))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from lightning_tricks.recipes.models.layers import (
    CONV_NORMS,
    check_choice,
    check_probability,
    conv3x3,
    make_activation,
    make_norm,
    pooled_classifier_head,
)
from lightning_tricks.recipes.models.registry import register_variant


class SmallCNN(nn.Module):
    """Blocks of conv3x3 -> norm -> activation -> 2x2 max-pool, then global average pool and a linear head.

    Pooling uses ``ceil_mode`` so a 1x1 map stays 1x1: three blocks work on 8x8 digits as well as
    on 32x32 or 224x224 images.

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        widths: output channels of each block.
        norm: ``"batch"``, ``"group"``, ``"layer"`` or ``"none"``.
        dropout: dropout probability before the classifier.
        drop_connect: DropConnect probability on the classifier weights.
        activation: nonlinearity: ``relu``, ``leaky_relu``, ``elu``, ``gelu``, ``tanh`` or ``sigmoid``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        widths: Sequence[int] = (32, 64, 128),
        norm: str = "batch",
        dropout: float = 0.0,
        drop_connect: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        check_choice("norm", norm, CONV_NORMS)
        make_activation(activation)  # validates before anything is built
        check_probability("dropout", dropout)
        widths = tuple(widths)
        if not widths or any(w < 1 for w in widths):
            raise ValueError(f"widths must be a non-empty sequence of positive ints, got {widths!r}")
        blocks: list[nn.Module] = []
        channels = in_channels
        for width in widths:
            blocks += [
                conv3x3(channels, width, bias=norm == "none"),
                make_norm(norm, width),
                make_activation(activation),
                nn.MaxPool2d(2, ceil_mode=True),
            ]
            channels = width
        self.features = nn.Sequential(*blocks)
        self.pool, self.dropout, self.classifier = pooled_classifier_head(
            channels, num_classes, dropout, drop_connect
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.pool(self.features(x))))


small_cnn = register_variant(
    "small_cnn",
    SmallCNN,
    input_sizes=(8, 32, 224),
    doc="""Small plain CNN (see :class:`SmallCNN`).

    Example::

        create_model("small_cnn", num_classes=10, in_channels=1, norm="group")
    """,
)
