"""Stochastic depth (DropPath) and DropBlock in the zoo's residual networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torchvision.ops import DropBlock2d, StochasticDepth

from lightning_tricks.recipes.models import create_model
from lightning_tricks.recipes.models.cifar_resnet import BasicBlock
from lightning_tricks.recipes.models.preact_resnet import PreActBlock

# (model, kwargs, residual blocks from input to output)
RESIDUAL = [
    ("resnet20", {}, 9),
    ("preact_resnet18", {}, 8),
    ("wide_resnet", {"depth": 16, "widen_factor": 1}, 6),
]


def blocks_in_order(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (BasicBlock, PreActBlock))]


@pytest.mark.parametrize(("name", "kwargs", "depth"), RESIDUAL)
def test_drop_path_follows_the_linear_decay_rule_and_is_identity_at_eval(name, kwargs, depth):
    rate = 0.3
    torch.manual_seed(0)
    net = create_model(name, num_classes=10, drop_path=rate, **kwargs)
    blocks = blocks_in_order(net)
    assert len(blocks) == depth
    # Huang et al. (2016): survival p_l = 1 - l / L * (1 - p_L), with p_L = 1 - rate
    expected_survival = [1 - (layer / depth) * rate for layer in range(1, depth + 1)]
    for block, survival in zip(blocks, expected_survival, strict=True):
        assert isinstance(block.drop_path, StochasticDepth) and block.drop_path.mode == "row"
        assert 1 - block.drop_path.p == pytest.approx(survival, rel=1e-12)

    plain = create_model(name, num_classes=10, **kwargs)
    plain.load_state_dict(net.state_dict())  # DropPath adds no weights
    x = torch.randn(4, 3, 32, 32)
    net.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))
    net.train(), plain.train()
    torch.manual_seed(1)
    with torch.no_grad():
        assert not torch.allclose(net(x), plain(x))


def test_drop_path_drops_whole_samples_with_its_rate():
    block = create_model("resnet20", num_classes=10, drop_path=0.5).layer3[-1]
    branch = torch.ones(4000, 2, 3, 3)
    torch.manual_seed(0)
    out = block.drop_path.train()(branch)
    kept = out.flatten(1).amax(1) > 0
    # a sample's whole branch is zeroed or kept (and scaled by 1 / (1 - p)): "row" mode
    assert torch.all(out[kept] == 2.0) and torch.all(out[~kept] == 0.0)
    assert kept.float().mean().item() == pytest.approx(0.5, abs=4 * (0.25 / 4000) ** 0.5)


@pytest.mark.parametrize(("name", "kwargs", "_"), RESIDUAL)
def test_drop_block_after_the_last_two_stages_and_identity_at_eval(name, kwargs, _):
    net = create_model(name, num_classes=10, drop_block=0.2, drop_block_size=3, **kwargs)
    assert isinstance(net.drop_block, DropBlock2d)
    assert (net.drop_block.p, net.drop_block.block_size) == (0.2, 3)
    plain = create_model(name, num_classes=10, **kwargs)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(2, 3, 32, 32)
    net.eval(), plain.eval()
    with torch.no_grad():
        assert torch.equal(net(x), plain(x))
    calls = []
    net.drop_block.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape[1:])))
    net.train()
    net(x)
    assert len(calls) == 2 and calls[0][1] == 2 * calls[1][1]  # after the last two stages


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"drop_path": 1.0}, r"drop_path must satisfy 0 <= drop_path < 1; got 1\.0"),
        ({"drop_path": -0.1}, r"drop_path must satisfy 0 <= drop_path < 1; got -0\.1"),
        ({"drop_block": 1.5}, r"drop_block must satisfy 0 <= drop_block < 1; got 1\.5"),
        ({"drop_block": 0.1, "drop_block_size": 0}, r"drop_block_size must be an odd integer >= 1 .*; got 0"),
        ({"drop_block": 0.1, "drop_block_size": 4}, r"drop_block_size must be an odd integer >= 1 .*; got 4"),
    ],
)
def test_bad_drop_rates_fail_naming_the_argument(kwargs, match):
    for name, extra, _ in RESIDUAL:
        with pytest.raises(ValueError, match=match):
            create_model(name, num_classes=10, **extra, **kwargs)


def test_regularization_off_switches_off_drop_path_drop_block_dropout_and_drop_connect():
    from lightning_tricks.recipes import ImageClassifier, RegularizationConfig

    arch = {"depth": 10, "widen_factor": 1}
    model = ImageClassifier(
        "wide_resnet",
        num_classes=10,
        model_kwargs={**arch, "drop_path": 0.5, "drop_block": 0.3},
        regularization=RegularizationConfig(dropout=0.5, drop_connect=0.5),
    ).train()
    from lightning_tricks.recipes.models.layers import DropConnectLinear

    drop_layers = [m for m in model.net.modules() if getattr(m, "p", 0) > 0]
    for kind in (StochasticDepth, DropBlock2d, nn.Dropout, DropConnectLinear):
        assert any(isinstance(m, kind) for m in drop_layers), kind
    plain = ImageClassifier("wide_resnet", num_classes=10, model_kwargs=arch).train()
    plain.load_state_dict(model.state_dict())  # the drop layers add no weights
    x = torch.randn(4, 3, 16, 16)
    saved = [getattr(m, "p", None) for m in model.net.modules()]
    with torch.no_grad():
        torch.manual_seed(0)
        assert not torch.allclose(model(x), plain(x))
        with model.regularization_scaled(0):
            torch.manual_seed(0)
            first = model(x)
            torch.manual_seed(1)
            second = model(x)
        expected = plain(x)  # train mode too: batch statistics, no random layer
    assert torch.equal(first, second)
    torch.testing.assert_close(first, expected)
    assert saved == [getattr(m, "p", None) for m in model.net.modules()]  # rates restored


def test_drop_block_fits_its_block_to_small_feature_maps():
    from torchvision.ops import drop_block2d

    net = create_model(
        "wide_resnet", num_classes=10, depth=10, widen_factor=1, drop_block=0.5, drop_block_size=5
    )
    x = torch.randn(6, 4, 4, 4)
    with pytest.raises(ValueError, match="block size should be odd"):  # torchvision's clip to 4 fails
        drop_block2d(x, 0.5, 5, training=True)
    torch.manual_seed(0)
    out = net.drop_block.train()(x)
    torch.manual_seed(0)
    torch.testing.assert_close(out, drop_block2d(x, 0.5, 3, training=True))  # the largest odd side <= 4
    torch.manual_seed(0)
    net.train()(torch.randn(2, 3, 8, 8))  # 4x4 and 2x2 maps after the last two stages
