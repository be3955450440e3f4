"""Fully connected baselines: softmax regression and the two-layer MLP.

Example::

    from lightning_tricks.recipes.models import create_model

    mlp = create_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=100)
"""

from __future__ import annotations

import torch
from torch import nn

from lightning_tricks.recipes.models.layers import (
    check_choice,
    check_probability,
    make_activation,
    make_classifier,
)
from lightning_tricks.recipes.models.registry import register_model, register_variant

MLP_NORMS: tuple[str, ...] = ("none", "batch", "layer")


def _flat_features(in_channels: int, input_size: int) -> int:
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")
    return in_channels * input_size * input_size


class MLP(nn.Module):
    """Flatten -> Linear(hidden) -> [norm] -> activation -> Dropout -> classifier.

    With ``hidden=0`` there is no hidden layer: the model is softmax regression
    (a single linear map on the flattened image).

    Args:
        num_classes: number of output logits.
        in_channels: image channels.
        input_size: side of the square input image (the model flattens it).
        hidden: hidden units; ``0`` means no hidden layer.
        norm: ``"none"``, ``"batch"`` (BatchNorm1d) or ``"layer"`` (LayerNorm) after the hidden linear.
        dropout: dropout probability before the classifier.
        drop_connect: DropConnect probability on the classifier weights.
        activation: hidden nonlinearity: ``relu``, ``leaky_relu``, ``elu``, ``gelu``, ``tanh`` or ``sigmoid``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        input_size: int = 32,
        hidden: int = 100,
        norm: str = "none",
        dropout: float = 0.0,
        drop_connect: float = 0.0,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        check_choice("norm", norm, MLP_NORMS)
        act = make_activation(activation)
        check_probability("dropout", dropout)
        if hidden < 0:
            raise ValueError(f"hidden must be >= 0, got {hidden}")
        features = _flat_features(in_channels, input_size)
        self.flatten = nn.Flatten()
        self.hidden: nn.Module = nn.Identity()
        if hidden > 0:
            norm_layer = {"none": nn.Identity, "batch": nn.BatchNorm1d, "layer": nn.LayerNorm}[norm]
            self.hidden = nn.Sequential(
                nn.Linear(features, hidden, bias=norm != "batch"), norm_layer(hidden), act
            )
            features = hidden
        elif norm != "none":
            raise ValueError(f"norm={norm!r} needs a hidden layer (hidden > 0)")
        self.dropout = nn.Dropout(dropout)
        self.classifier = make_classifier(features, num_classes, drop_connect)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.hidden(self.flatten(x))))


mlp = register_variant(
    "mlp",
    MLP,
    input_sizes=(8, 32),
    doc="""Two-layer MLP: flatten -> Linear(``hidden``) -> ReLU -> Linear(``num_classes``).

    Example::

        create_model("mlp", num_classes=10, in_channels=1, input_size=8)
    """,
)


@register_model("linear", input_sizes=(8, 32))
def linear(
    num_classes: int,
    in_channels: int = 3,
    input_size: int = 32,
    norm: str = "none",
    dropout: float = 0.0,
    drop_connect: float = 0.0,
) -> MLP:
    """Softmax regression: flatten -> Linear(``num_classes``). ``norm`` only accepts ``"none"``.

    Example::

        create_model("linear", num_classes=10, in_channels=1, input_size=8)
    """
    check_choice("norm", norm, ("none",))
    return MLP(num_classes, in_channels, input_size, 0, norm, dropout, drop_connect)
