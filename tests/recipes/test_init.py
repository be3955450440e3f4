import math

import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from lightning_tricks.recipes.init import InitConfig, initialize

LINEAR_FANS = (1000, 500)  # Linear(1000, 500): fan_in 1000, fan_out 500
CONV_FANS = (64 * 9, 128 * 9)  # Conv2d(64, 128, 3): fan_in 576, fan_out 1152


def expected_variance(scheme: str, mode: str, fan_in: int, fan_out: int) -> float:
    if scheme.startswith("lecun"):
        return 1 / fan_in
    if scheme.startswith("glorot"):
        return 2 / (fan_in + fan_out)
    return 2 / (fan_in if mode == "fan_in" else fan_out)


@pytest.mark.parametrize(
    ("scheme", "mode"),
    [
        ("lecun_normal", "fan_in"),
        ("lecun_uniform", "fan_in"),
        ("glorot_normal", "fan_in"),
        ("glorot_uniform", "fan_in"),
        ("he_normal", "fan_in"),
        ("he_normal", "fan_out"),
        ("he_uniform", "fan_in"),
        ("he_uniform", "fan_out"),
    ],
)
def test_variance_matches_formula(scheme: str, mode: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 500), nn.Conv2d(64, 128, 3))
    initialize(model, InitConfig(scheme=scheme, mode=mode))
    for layer, (fan_in, fan_out) in ((model[0], LINEAR_FANS), (model[1], CONV_FANS)):
        w = layer.weight.detach()
        target = expected_variance(scheme, mode, fan_in, fan_out)
        assert w.var().item() == pytest.approx(target, rel=0.03)
        assert abs(w.mean().item()) < 0.02 * math.sqrt(target)
        if scheme.endswith("uniform"):
            assert w.abs().max().item() <= math.sqrt(3 * target) + 1e-7
        assert torch.count_nonzero(layer.bias) == 0


def test_orthogonal_rows_are_orthonormal() -> None:
    model = nn.Sequential(nn.Linear(1000, 500), nn.Conv2d(64, 128, 3))
    initialize(model, InitConfig(scheme="orthogonal"))
    w = model[0].weight.detach()
    assert torch.allclose(w @ w.T, torch.eye(500), atol=1e-4)
    wc = model[1].weight.detach().flatten(1)  # (128, 576)
    assert torch.allclose(wc @ wc.T, torch.eye(128), atol=1e-4)


def test_norm_layers_reset_and_bias_flag() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2), nn.LayerNorm(2))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.7)
    initialize(model, InitConfig(scheme="he_normal", zero_bias=False))
    assert torch.all(model[1].weight == 1) and torch.all(model[1].bias == 0)
    assert torch.all(model[3].weight == 1) and torch.all(model[3].bias == 0)
    assert torch.all(model[0].bias == 0.7) and torch.all(model[2].bias == 0.7)


def test_default_scheme_leaves_everything_untouched() -> None:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    initialize(model, InitConfig())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class ZooBlock(nn.Module):
    def __init__(self, with_norm: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(4)
        self.last_norm = self.bn2 if with_norm else None


def test_zero_init_residual_zeroes_exactly_the_last_norms() -> None:
    model = nn.Sequential(
        nn.BatchNorm2d(4),
        ZooBlock(),
        ZooBlock(with_norm=False),
        BasicBlock(4, 4),
        Bottleneck(16, 4),
    )
    last = {id(model[1].bn2.weight), id(model[3].bn2.weight), id(model[4].bn3.weight)}
    initialize(model, InitConfig(scheme="he_normal", zero_init_residual=True))
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            zero = id(module.weight) in last
            assert torch.all(module.weight == 0) if zero else torch.all(module.weight == 1)
            assert torch.all(module.bias == 0)


def test_zero_init_residual_with_default_scheme() -> None:
    block = ZooBlock()
    initialize(block, InitConfig(zero_init_residual=True))
    assert torch.all(block.bn2.weight == 0) and torch.all(block.bn1.weight == 1)


def test_zero_init_residual_without_residual_blocks_fails() -> None:
    with pytest.raises(ValueError, match=r"init\.zero_init_residual"):
        initialize(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), InitConfig(zero_init_residual=True))


@pytest.mark.parametrize(
    ("kwargs", "field"), [({"scheme": "xavier"}, "init.scheme"), ({"mode": "fan_avg"}, "init.mode")]
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        InitConfig(**kwargs)


@pytest.mark.parametrize("std", [None, 0.05])
def test_small_normal_is_zero_mean_with_fixed_sigma_whatever_the_fan_in(std) -> None:
    sigma = 0.01 if std is None else std
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1000, 500), nn.Conv2d(64, 128, 3))
    initialize(model, InitConfig(scheme="small_normal", std=std))
    for layer in model:
        w = layer.weight.detach().flatten().double()
        n = w.numel()
        # sample mean ~ N(0, sigma^2 / n); sample variance ~ sigma^2 (1 +- 4 sqrt(2 / n))
        assert abs(w.mean().item()) < 4 * sigma / math.sqrt(n)
        assert w.var().item() == pytest.approx(sigma**2, rel=4 * math.sqrt(2 / n))
        assert torch.equal(layer.bias.detach(), torch.zeros_like(layer.bias))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"scheme": "he_normal", "std": 0.01},
            r"init\.std=0\.01 only applies to init\.scheme='small_normal'",
        ),
        ({"scheme": "small_normal", "std": 0.0}, r"init\.std must be a finite number > 0, got 0\.0"),
        ({"scheme": "small_normal", "std": -1.0}, r"init\.std must be a finite number > 0"),
    ],
)
def test_small_normal_std_is_validated(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        InitConfig(**kwargs)
