"""The nonlinearity as a choice in the zoo's MLP and small CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_tricks.recipes.models import create_model

REFERENCE = {
    "relu": F.relu,
    "leaky_relu": lambda z: torch.where(z > 0, z, 0.01 * z),
    "elu": lambda z: torch.where(z > 0, z, torch.exp(z) - 1),
    "gelu": lambda z: z * 0.5 * (1 + torch.erf(z / 2**0.5)),
    "tanh": torch.tanh,
    "sigmoid": lambda z: 1 / (1 + torch.exp(-z)),
}


@pytest.mark.parametrize("activation", sorted(REFERENCE))
def test_mlp_hidden_layer_uses_the_chosen_nonlinearity(activation):
    torch.manual_seed(0)
    net = create_model("mlp", num_classes=10, in_channels=1, input_size=8, hidden=16, activation=activation)
    x = torch.randn(5, 1, 8, 8)
    hidden, out = net.hidden[0], net.classifier
    expected = out(REFERENCE[activation](hidden(x.flatten(1))))
    with torch.no_grad():
        assert torch.allclose(net(x), expected, atol=1e-6)


@pytest.mark.parametrize("activation", sorted(REFERENCE))
def test_small_cnn_blocks_use_the_chosen_nonlinearity(activation):
    torch.manual_seed(0)
    net = create_model("small_cnn", num_classes=10, in_channels=1, widths=(4, 8), activation=activation)
    conv, norm = net.features[0], net.features[1].eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(net.features[2](norm(conv(x))), REFERENCE[activation](norm(conv(x))), atol=1e-6)
    assert (
        sum(
            isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid))
            for m in net.modules()
        )
        == 2
    )


@pytest.mark.parametrize("name", ["mlp", "small_cnn"])
def test_unknown_activation_fails_listing_the_choices(name):
    with pytest.raises(
        ValueError, match=r"activation must be one of 'relu', 'leaky_relu', .*'sigmoid'; got 'swish'"
    ):
        create_model(name, num_classes=10, in_channels=1, activation="swish")
