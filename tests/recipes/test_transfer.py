"""Transfer learning in the recipe: layer-wise decayed learning rates, local pretrained weights, timm models
by name and the multi-stage linear probe, each against a reference computed here (or timm's own)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lightning_tricks.recipes import ImageClassifier, OptimizerConfig, SchedulerConfig
from lightning_tricks.recipes.models import create_model, get_classifier
from lightning_tricks.recipes.models.probe import MultiStageLinearProbe
from lightning_tricks.recipes.optim import build_optimizer
from lightning_tricks.recipes.schedules import build_scheduler

timm = pytest.importorskip("timm")
from timm.optim import param_groups_layer_decay  # noqa: E402

# resnet20's top-level stages with parameters, from the input: depth from the head counted by hand.
RESNET20_DEPTHS = {"stem": 4, "layer1": 3, "layer2": 2, "layer3": 1, "classifier": 0}


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict]:
    return {id(p): group for group in optimizer.param_groups for p in group["params"]}


def test_layer_decay_gives_each_layer_base_times_decay_to_its_depth_with_multipliers_and_decay_split():
    net = create_model("resnet20", num_classes=10)
    config = OptimizerConfig(
        name="sgd", lr=0.1, weight_decay=5e-4, layer_decay=0.5, lr_multipliers={"norm_bias": 4.0}
    )
    optimizer = build_optimizer(net, config, global_batch_size=None)
    group_of = _group_of(optimizer)
    norm_bias = {id(m.bias) for m in net.modules() if isinstance(m, nn.BatchNorm2d) and m.bias is not None}
    no_decay = {id(p) for m in net.modules() for n, p in m.named_parameters(recurse=False) if n == "bias"}
    no_decay |= {id(p) for m in net.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()}
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(net.parameters()))
    for name, param in net.named_parameters():
        depth = RESNET20_DEPTHS[name.split(".")[0]]
        multiplier = 4.0 if id(param) in norm_bias else 1.0
        group = group_of[id(param)]
        assert group["lr"] == pytest.approx(0.1 * multiplier * 0.5**depth), name
        assert group["weight_decay"] == (0.0 if id(param) in no_decay else 5e-4), name


def test_layer_decay_on_a_timm_model_matches_timm_param_groups_layer_decay():
    net = create_model("timm/resnet18", num_classes=10)
    optimizer = build_optimizer(net, OptimizerConfig(name="adamw", lr=1.0, layer_decay=0.7))
    reference = param_groups_layer_decay(net, weight_decay=0.0, layer_decay=0.7)
    scale = {id(p): group["lr_scale"] for group in reference for p in group["params"]}
    group_of = _group_of(optimizer)
    assert len({g["lr"] for g in optimizer.param_groups}) == 10  # stem, 8 blocks, head
    for name, param in net.named_parameters():
        assert group_of[id(param)]["lr"] == pytest.approx(scale[id(param)]), name


def test_layer_decay_ratios_survive_the_linear_scaling_rule_warmup_and_cosine():
    net = create_model("resnet20", num_classes=10)
    config = OptimizerConfig(name="sgd", lr=0.1, layer_decay=0.5, base_batch_size=32)
    optimizer = build_optimizer(net, config, global_batch_size=128)
    depths = [g["layer_depth"] for g in optimizer.param_groups]
    scheduler = build_scheduler(
        optimizer,
        SchedulerConfig(name="cosine", interval="step", warmup=3),
        total_steps=10,
        steps_per_epoch=10,
    )["scheduler"]
    for _ in range(6):
        optimizer.step()
        scheduler.step()
        head_lr = next(g["lr"] for g in optimizer.param_groups if g["layer_depth"] == 0)
        for group, depth in zip(optimizer.param_groups, depths, strict=True):
            assert group["lr"] == pytest.approx(head_lr * 0.5**depth)
    assert optimizer.param_groups[0]["initial_lr"] == pytest.approx(0.1 * 128 / 32 * 0.5 ** depths[0])


@pytest.mark.parametrize("bad", [0.0, -0.5, 1.5])
def test_layer_decay_outside_zero_one_is_rejected_naming_the_key(bad):
    with pytest.raises(ValueError, match=r"optimizer\.layer_decay must be in \(0, 1\]"):
        OptimizerConfig(layer_decay=bad)


# -- local pretrained weights -----------------------------------------------------------------------
def test_pretrained_file_loads_every_weight(tmp_path):
    source = create_model("resnet20", num_classes=10, in_channels=1)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = ImageClassifier("resnet20", num_classes=10, in_channels=1, pretrained=str(tmp_path / "w.pt"))
    for key, value in source.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key


def test_pretrained_with_another_head_size_reinitialises_only_the_head_and_says_so(tmp_path):
    source = create_model("resnet20", num_classes=100, in_channels=1)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    with pytest.warns(UserWarning, match=r"classifier\.weight \(10, 64\).*re-initialised"):
        model = ImageClassifier("resnet20", num_classes=10, in_channels=1, pretrained=str(tmp_path / "w.pt"))
    assert get_classifier(model.net).out_features == 10
    for key, value in source.state_dict().items():
        if not key.startswith("classifier."):
            assert torch.equal(model.net.state_dict()[key], value), key


def test_pretrained_from_a_recipe_checkpoint_strips_the_net_prefix(tmp_path):
    source = ImageClassifier("small_cnn", num_classes=10, in_channels=1)
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, tmp_path / "last.ckpt")
    model = ImageClassifier(
        "small_cnn", num_classes=10, in_channels=1, pretrained=str(tmp_path / "last.ckpt")
    )
    for key, value in source.net.state_dict().items():
        assert torch.equal(model.net.state_dict()[key], value), key


def test_pretrained_missing_file_and_mismatched_keys_fail_naming_key_and_keys(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model\.init_args\.pretrained='.*nope\.pt' is not a file"):
        ImageClassifier("resnet20", pretrained=str(tmp_path / "nope.pt"))
    torch.save(create_model("small_cnn", num_classes=10).state_dict(), tmp_path / "cnn.pt")
    with pytest.raises(
        ValueError,
        match=r"missing from the file: layer1\.0\.bn1\.bias, .*and \d+ more; "
        r"not in the model: features\.0\.weight",
    ):
        ImageClassifier("resnet20", pretrained=str(tmp_path / "cnn.pt"))
    torch.save(create_model("resnet20", num_classes=10, in_channels=3).state_dict(), tmp_path / "rgb.pt")
    with pytest.raises(
        ValueError, match=r"shape: stem\.0\.weight \(file \(16, 3, 3, 3\), model \(16, 1, 3, 3\)\)"
    ):
        ImageClassifier("resnet20", in_channels=1, pretrained=str(tmp_path / "rgb.pt"))


# -- timm models by name ----------------------------------------------------------------------------
def test_timm_model_by_name_is_timms_architecture_with_the_requested_shapes():
    torch.manual_seed(0)
    net = create_model("timm/resnet18", num_classes=7, in_channels=1, drop_path_rate=0.1)
    torch.manual_seed(0)
    reference = timm.create_model("resnet18", num_classes=7, in_chans=1, drop_path_rate=0.1)
    assert net.state_dict().keys() == reference.state_dict().keys()
    net.load_state_dict(reference.state_dict())
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(net.eval()(x), reference.eval()(x))
    assert get_classifier(net).out_features == 7


def test_unknown_timm_name_fails_with_close_matches_and_pretrained_true_is_refused():
    with pytest.raises(ValueError, match=r"timm has no architecture 'resnet81'; did you mean timm/resnet18"):
        create_model("timm/resnet81", num_classes=10)
    with pytest.raises(ValueError, match=r"never downloaded.*model\.init_args\.pretrained"):
        create_model("timm/resnet18", num_classes=10, pretrained=True)


def test_timm_name_without_timm_installed_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-tricks\[timm\]'"):
        create_model("timm/resnet18", num_classes=10)


# -- multi-stage linear probe -----------------------------------------------------------------------
def test_linear_probe_logits_equal_a_linear_map_of_pooled_stage_features_taken_with_hooks():
    torch.manual_seed(0)
    backbone = create_model("resnet20", num_classes=10, in_channels=1)
    reference = create_model("resnet20", num_classes=10, in_channels=1)
    reference.load_state_dict(backbone.state_dict())
    probe = MultiStageLinearProbe(backbone, ["layer2", "layer3"], num_classes=10, in_channels=1)
    captured: dict[str, torch.Tensor] = {}
    for name in ("layer2", "layer3"):
        reference.get_submodule(name).register_forward_hook(
            lambda module, args, out, name=name: captured.__setitem__(name, out)
        )
    x = torch.randn(4, 1, 8, 8)
    reference.eval()(x)
    features = torch.cat([captured["layer2"].mean(dim=(2, 3)), captured["layer3"].mean(dim=(2, 3))], dim=1)
    assert probe.classifier.in_features == 32 + 64
    expected = features @ probe.classifier.weight.T + probe.classifier.bias
    torch.testing.assert_close(probe.train()(x), expected)


def test_linear_probe_trains_only_its_head_and_keeps_the_backbone_frozen_in_eval(tmp_path):
    source = create_model("resnet20", num_classes=10, in_channels=1)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model = ImageClassifier(
        "linear_probe",
        num_classes=10,
        in_channels=1,
        model_kwargs={"backbone": "resnet20", "backbone_pretrained": str(tmp_path / "w.pt"), "input_size": 8},
    )
    before = {k: v.clone() for k, v in model.net.backbone.state_dict().items()}
    assert {k for k, _ in before.items() if k.startswith("layer1.0.conv1")} == {"layer1.0.conv1.weight"}
    assert torch.equal(before["layer1.0.conv1.weight"], source.state_dict()["layer1.0.conv1.weight"])
    optimizer = build_optimizer(model.net, model.optimizer_config)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.net.classifier.parameters()
    }
    model.train()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(3):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    for key, value in model.net.backbone.state_dict().items():
        assert torch.equal(value, before[key]), key  # weights and BatchNorm running statistics


def test_linear_probe_unknown_stage_fails_naming_it_and_the_stages():
    with pytest.raises(
        ValueError, match=r"\['layer9'\] not module\(s\).*stem, layer1, layer2, layer3, classifier"
    ):
        create_model("linear_probe", num_classes=10, backbone="resnet20", stages=["layer2", "layer9"])
