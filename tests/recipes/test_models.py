"""Model zoo: output shapes, paper parameter counts, argument errors, DropConnect, transfer learning."""

from __future__ import annotations

import inspect

import pytest
import torch
import torchvision
from torch import nn

from lightning_tricks.recipes.models import (
    DropConnectLinear,
    create_model,
    get_classifier,
    get_model_entry,
    list_models,
    make_norm,
)
from lightning_tricks.recipes.models.layers import group_norm_groups

NUM_CLASSES = 7


def _size_kwargs(name: str, size: int) -> dict:
    params = inspect.signature(get_model_entry(name).factory).parameters
    return {"input_size": size} if "input_size" in params else {}


def _cases() -> list:
    cases = []
    for name in list_models():
        sizes = get_model_entry(name).input_sizes
        for size in sizes:
            cases.append(pytest.param(name, size, 3, id=f"{name}-{size}-rgb"))
        cases.append(pytest.param(name, min(sizes), 1, id=f"{name}-{min(sizes)}-grey"))
    return cases


@pytest.mark.parametrize(("name", "size", "in_channels"), _cases())
@torch.no_grad()
def test_output_shape_for_each_input_size(name: str, size: int, in_channels: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES, in_channels, **_size_kwargs(name, size)).eval()
    batch = 1 if size >= 224 else 2
    out = model(torch.randn(batch, in_channels, size, size))
    assert out.shape == (batch, NUM_CLASSES)
    assert torch.isfinite(out).all()
    assert get_classifier(model).out_features == NUM_CLASSES


def test_registry_lists_every_family() -> None:
    expected = {
        "linear",
        "mlp",
        "small_cnn",
        "resnet20",
        "resnet32",
        "resnet44",
        "resnet56",
        "resnet110",
        "preact_resnet18",
        "wide_resnet",
        "wrn_28_10",
        "wrn_16_8",
        "resnet18",
        "resnet50",
    }
    assert expected <= set(list_models())


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    ("name", "paper_count"),
    [
        ("resnet20", 0.27e6),
        ("resnet32", 0.46e6),
        ("resnet44", 0.66e6),
        ("resnet56", 0.85e6),
        ("resnet110", 1.7e6),
    ],
)
def test_cifar_resnet_parameter_counts_match_paper(name: str, paper_count: float) -> None:
    count = _num_params(create_model(name, 10))
    assert abs(count - paper_count) / paper_count < 0.03, count


def test_option_a_shortcut_is_parameter_free_and_b_adds_projections() -> None:
    a = create_model("resnet20", 10, shortcut="A")
    b = create_model("resnet20", 10, shortcut="B")
    # Two projection shortcuts (16->32, 32->64), each a 1x1 conv plus a BatchNorm.
    assert _num_params(b) - _num_params(a) == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    x = torch.randn(2, 3, 32, 32)
    assert a.eval()(x).shape == b.eval()(x).shape == (2, 10)


def test_wide_resnet_parameter_counts_match_paper() -> None:
    assert abs(_num_params(create_model("wrn_28_10", 10)) - 36.5e6) / 36.5e6 < 0.01
    wrn_16_8 = create_model("wide_resnet", 10, depth=16, widen_factor=8)
    assert abs(_num_params(wrn_16_8) - 11.0e6) / 11.0e6 < 0.01


def test_mlp_shape_follows_hidden_and_input_size() -> None:
    model = create_model("mlp", 10, 1, input_size=8, hidden=100)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 100), (100, 10)]
    linear = create_model("linear", 10, 1, input_size=8)
    assert _num_params(linear) == 64 * 10 + 10


def test_unknown_model_name_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"unknown model 'resnet21'.*resnet20"):
        create_model("resnet21", 10)


def test_unknown_kwarg_names_the_model() -> None:
    with pytest.raises(TypeError, match=r"model 'resnet20'.*\['widen_factor'\]"):
        create_model("resnet20", 10, widen_factor=2)


@pytest.mark.parametrize("name", ["small_cnn", "resnet20", "preact_resnet18", "resnet18", "mlp"])
def test_bad_norm_names_norm_and_choices(name: str) -> None:
    with pytest.raises(ValueError, match=r"norm must be one of .*'batch'.*got 'instance'"):
        create_model(name, 10, norm="instance")


def test_mlp_rejects_group_norm() -> None:
    with pytest.raises(ValueError, match="norm"):
        create_model("mlp", 10, norm="group")


@pytest.mark.parametrize("name", ["small_cnn", "resnet20", "mlp", "resnet18", "wide_resnet"])
@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_dropout_out_of_range(name: str, p: float) -> None:
    with pytest.raises(ValueError, match="dropout"):
        create_model(name, 10, dropout=p)
    with pytest.raises(ValueError, match="drop_connect"):
        create_model(name, 10, drop_connect=p)


@pytest.mark.parametrize("depth", [27, 29, 4])
def test_wide_resnet_bad_depth_names_depth(depth: int) -> None:
    with pytest.raises(ValueError, match=rf"depth.*got {depth}"):
        create_model("wide_resnet", 10, depth=depth, widen_factor=1)


def test_wide_resnet_depth_sets_block_count() -> None:
    model = create_model("wide_resnet", 10, depth=16, widen_factor=1)
    assert [len(stage) for stage in model.layers] == [2, 2, 2]


@pytest.mark.parametrize(
    ("norm", "kind", "groups"),
    [
        ("batch", nn.BatchNorm2d, None),
        ("group", nn.GroupNorm, 4),
        ("layer", nn.GroupNorm, 1),
        ("none", nn.Identity, None),
    ],
)
def test_norm_choice_reaches_every_layer(norm: str, kind: type, groups: int | None) -> None:
    model = create_model("resnet20", 10, norm=norm)
    first_block = model.layer1[0]
    assert type(first_block.bn1) is kind
    if groups is not None:
        assert first_block.bn1.num_groups == groups
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) or norm == "batch"
    assert (first_block.last_norm is None) == (norm == "none")
    # Without a norm the convolutions need their own bias.
    assert (first_block.conv1.bias is not None) == (norm == "none")


def test_group_norm_groups() -> None:
    assert group_norm_groups(16) == 4
    assert group_norm_groups(64) == 16
    assert group_norm_groups(256) == 32
    assert group_norm_groups(3) == 1
    assert isinstance(make_norm("layer", 8), nn.GroupNorm) and make_norm("layer", 8).num_groups == 1


def test_torchvision_group_norm_has_no_batch_norm() -> None:
    model = create_model("resnet18", 10, norm="group")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert isinstance(model.layer1[0].bn1, nn.GroupNorm)


# --- residual blocks ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "kwargs", "num_blocks"),
    [
        ("resnet20", {}, 9),
        ("resnet20", {"shortcut": "B"}, 9),
        ("preact_resnet18", {}, 8),
        ("wide_resnet", {"depth": 16, "widen_factor": 1}, 6),
    ],
)
def test_every_residual_block_exposes_last_norm(name: str, kwargs: dict, num_blocks: int) -> None:
    model = create_model(name, 10, **kwargs)
    blocks = [m for m in model.modules() if hasattr(m, "conv2") and hasattr(m, "conv1")]
    assert len(blocks) == num_blocks
    for block in blocks:
        assert isinstance(block.last_norm, nn.BatchNorm2d)


@pytest.mark.parametrize("name", ["resnet20", "preact_resnet18"])
@torch.no_grad()
def test_zero_last_norm_makes_blocks_identity(name: str) -> None:
    """Zeroing ``last_norm`` must silence the residual branch, which is what the zero-init trick relies on."""
    model = create_model(name, 10).eval()
    block = model.layer1[0] if name == "resnet20" else model.layers[0][1]
    nn.init.zeros_(block.last_norm.weight)
    x = torch.randn(2, block.conv1.in_channels, 8, 8)
    expected = x.clamp_min(0) if name == "resnet20" else x  # post-activation blocks end with ReLU
    torch.testing.assert_close(block(x), expected)


def test_wide_resnet_dropout_sits_inside_blocks() -> None:
    model = create_model("wide_resnet", 10, depth=16, widen_factor=1, dropout=0.3)
    in_blocks = [m for m in model.layers.modules() if isinstance(m, nn.Dropout)]
    assert len(in_blocks) == 6 and all(m.p == 0.3 for m in in_blocks)
    assert model.dropout.p == 0.0


# --- DropConnect --------------------------------------------------------------------------------


def test_drop_connect_train_mode_masks_weights_at_rate_p() -> None:
    torch.manual_seed(0)
    layer = DropConnectLinear(200, 100, p=0.3).train()
    weight = layer.sample_weight()
    zero_fraction = (weight == 0).float().mean().item()
    assert abs(zero_fraction - 0.3) < 0.02
    kept = weight != 0
    torch.testing.assert_close(weight[kept], layer.weight[kept] / 0.7)
    x = torch.randn(4, 200)
    assert not torch.allclose(layer(x), layer(x))


def test_drop_connect_eval_mode_is_plain_linear() -> None:
    layer = DropConnectLinear(20, 5, p=0.5).eval()
    x = torch.randn(4, 20)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(layer(x), layer(x))


@torch.no_grad()
def test_drop_connect_expectation_matches_plain_output() -> None:
    torch.manual_seed(0)
    layer = DropConnectLinear(16, 4, p=0.5).train()
    x = torch.randn(3, 16)
    mean = torch.stack([layer(x) for _ in range(4000)]).mean(0)
    plain = nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(mean, plain, atol=0.05, rtol=0.0)


def test_drop_connect_kwarg_builds_drop_connect_head() -> None:
    for name in ("resnet20", "small_cnn", "mlp", "resnet18"):
        head = get_classifier(create_model(name, 10, drop_connect=0.4))
        assert isinstance(head, DropConnectLinear) and head.p == 0.4
    assert type(get_classifier(create_model("resnet20", 10))) is nn.Linear


# --- torchvision transfer learning -------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    torch.manual_seed(1)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(state, path)
    return str(path), state


def _trainable(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def test_weights_path_loads_backbone_and_replaces_head(resnet18_file: tuple[str, dict]) -> None:
    path, state = resnet18_file
    with pytest.warns(
        UserWarning, match="its classifier has 1000 classes, the model 5; the classifier is re-init"
    ):
        model = create_model("resnet18", 5, weights_path=path)
    loaded = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(loaded[key], value, msg=key)
    assert model.fc.out_features == 5 and model.fc.in_features == 512
    assert _trainable(model) == {name for name, _ in model.named_parameters()}


def test_weights_path_keeps_head_when_classes_match(resnet18_file: tuple[str, dict]) -> None:
    path, state = resnet18_file
    model = create_model("resnet18", 1000, weights_path=path, drop_connect=0.2)
    assert isinstance(model.fc, DropConnectLinear)
    torch.testing.assert_close(model.fc.weight, state["fc.weight"])


@pytest.mark.filterwarnings(
    "ignore:weights_path.*the classifier is re-initialised"
)  # replaced head, on purpose
def test_weights_path_adapts_grey_stem(resnet18_file: tuple[str, dict]) -> None:
    path, state = resnet18_file
    model = create_model("resnet18", 5, in_channels=1, weights_path=path)
    torch.testing.assert_close(model.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))


@pytest.mark.filterwarnings(
    "ignore:weights_path.*the classifier is re-initialised"
)  # replaced head, on purpose
def test_freeze_backbone_leaves_only_head(resnet18_file: tuple[str, dict]) -> None:
    model = create_model("resnet18", 5, weights_path=resnet18_file[0], freeze="backbone")
    assert _trainable(model) == {"fc.weight", "fc.bias"}


@pytest.mark.filterwarnings(
    "ignore:weights_path.*the classifier is re-initialised"
)  # replaced head, on purpose
def test_freeze_stages_leaves_last_stages_and_head(resnet18_file: tuple[str, dict]) -> None:
    model = create_model("resnet18", 5, weights_path=resnet18_file[0], freeze="stages", trainable_stages=1)
    trainable = _trainable(model)
    all_names = {name for name, _ in model.named_parameters()}
    assert trainable == {n for n in all_names if n.startswith(("layer4.", "fc."))}
    two = _trainable(create_model("resnet18", 5, freeze="stages", trainable_stages=2))
    assert {n.split(".")[0] for n in two} == {"layer3", "layer4", "fc"}
    with pytest.raises(ValueError, match="trainable_stages"):
        create_model("resnet18", 5, freeze="stages", trainable_stages=5)


@pytest.mark.filterwarnings(
    "ignore:weights_path.*the classifier is re-initialised"
)  # replaced head, on purpose
def test_bad_freeze_mode() -> None:
    with pytest.raises(ValueError, match="freeze"):
        create_model("resnet18", 5, freeze="all")


def test_weights_file_of_another_architecture_names_the_keys(tmp_path) -> None:
    state = torchvision.models.resnet34(weights=None).state_dict()
    torch.save(state, tmp_path / "r34.pt")
    with pytest.raises(
        ValueError, match=r"does not fit resnet18: not in the model: layer1\.2\.bn1\.bias, .* and \d+ more\."
    ):
        create_model("resnet18", 1000, weights_path=str(tmp_path / "r34.pt"))


@pytest.mark.filterwarnings(
    "ignore:weights_path.*the classifier is re-initialised"
)  # replaced head, on purpose
def test_missing_weights_file_names_weights_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"weights_path.*nope\.pt"):
        create_model("resnet18", 5, weights_path=str(tmp_path / "nope.pt"))


def test_weights_from_another_architecture_are_rejected(resnet18_file: tuple[str, dict]) -> None:
    with pytest.raises(ValueError, match="weights_path"):
        create_model("mobilenet_v3_small", 5, weights_path=resnet18_file[0])
