"""DropConnect on any linear/conv layer of a zoo model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_tricks.recipes import ImageClassifier, RegularizationConfig
from lightning_tricks.recipes.models import DropConnectConv2d, DropConnectLinear, create_model


def test_selected_layers_drop_connections_and_keep_weights_names_and_eval_output():
    torch.manual_seed(0)
    net = create_model("resnet20", num_classes=10, drop_connect=0.25, drop_connect_layers=["layer3"])
    plain = create_model("resnet20", num_classes=10)
    assert net.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(net.state_dict())
    for name, m in net.named_modules():
        dropping = isinstance(m, (DropConnectConv2d, DropConnectLinear))
        assert dropping == (name.startswith("layer3.") and isinstance(m, nn.Conv2d)), name
        if dropping:
            assert m.p == 0.25
    x = torch.randn(2, 3, 32, 32)
    net.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))


def test_drop_connect_conv_masks_single_weights_with_its_rate():
    p, channels = 0.3, 64
    conv = create_model(
        "small_cnn", num_classes=10, widths=(channels,), drop_connect=p, drop_connect_layers="all"
    )
    layer = conv.features[0]
    assert isinstance(layer, DropConnectConv2d)
    # a 1x1 kernel reads back on one-hot inputs: output[j, o] = effective weight[o, j] at the centre tap
    probe = DropConnectConv2d(channels, channels, 1, bias=False, p=p)
    torch.manual_seed(0)
    effective = probe(torch.eye(channels).view(channels, channels, 1, 1)).detach().view(channels, channels).T
    weight = probe.weight.detach().view(channels, channels)
    dropped = effective == 0
    assert torch.allclose(effective[~dropped], weight[~dropped] / (1 - p))
    n = channels * channels
    assert dropped.float().mean().item() == pytest.approx(p, abs=4 * (p * (1 - p) / n) ** 0.5)
    probe.eval()
    assert torch.equal(
        probe(torch.eye(channels).view(channels, channels, 1, 1)).view(channels, channels).T, weight
    )


def test_regularization_switch_turns_conv_drop_connect_off_in_the_recipe():
    model = ImageClassifier(
        "small_cnn",
        num_classes=10,
        in_channels=1,
        model_kwargs={"drop_connect_layers": "all"},
        regularization=RegularizationConfig(drop_connect=0.3),
    )
    layers = [m for m in model.net.modules() if isinstance(m, (DropConnectConv2d, DropConnectLinear))]
    assert {type(m) for m in layers} == {DropConnectConv2d, DropConnectLinear} and len(layers) == 4
    with model.regularization_scaled(0.0):
        assert all(m.p == 0.0 for m in layers)
    assert all(m.p == 0.3 for m in layers)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"drop_connect": 0.1, "drop_connect_layers": ["layer9"]},
            r"drop_connect_layers names no module \['layer9'\]",
        ),
        (
            {"drop_connect": 0.0, "drop_connect_layers": "all"},
            r"drop_connect must satisfy 0 < drop_connect < 1",
        ),
        (
            {"drop_connect": 1.0, "drop_connect_layers": "all"},
            r"drop_connect must satisfy 0 < drop_connect < 1",
        ),
        (
            {"drop_connect": 0.1, "drop_connect_layers": ["pool"]},
            r"selects no nn\.Linear or nn\.Conv2d layer",
        ),
    ],
)
def test_bad_drop_connect_selection_fails_naming_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_model("resnet20", num_classes=10, **kwargs)


def test_regularization_off_zeroes_every_drop_layer_of_any_module_and_restores_it_on_error():
    from lightning_tricks.callbacks._sanity import regularization_off

    model = nn.Sequential(
        DropConnectConv2d(1, 2, 3, p=0.2), nn.Dropout2d(0.3), nn.FeatureAlphaDropout(0.4), nn.Flatten()
    )
    model.append(DropConnectLinear(2, 3, p=0.5))
    with pytest.raises(RuntimeError, match="inside"), regularization_off(model):
        assert [m.p for m in model if hasattr(m, "p")] == [0.0, 0.0, 0.0, 0.0]
        raise RuntimeError("inside")
    assert [m.p for m in model if hasattr(m, "p")] == [0.2, 0.3, 0.4, 0.5]
