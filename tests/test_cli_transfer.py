"""Transfer learning from YAML through `lightning-tricks fit`: pretrained weights, layer-wise learning rates,
gradual unfreezing and fine_tune, the multi-stage linear probe and timm models, on real digits."""

from __future__ import annotations

import pytest
import torch
from helpers import write_digits_recipe_config
from test_cli import run_cli

from lightning_tricks.cli import build_cli
from lightning_tricks.recipes.models import create_model

pytest.importorskip("timm")
from timm.optim import param_groups_layer_decay


def _groups_by_name(cli) -> dict[str, dict]:
    names = {id(p): n for n, p in cli.model.net.named_parameters()}
    return {names[id(p)]: g for g in cli.trainer.optimizers[0].param_groups for p in g["params"]}


def test_yaml_pretrained_layer_decay_and_gradual_unfreezing(tmp_path):
    source = create_model("resnet20", num_classes=5, in_channels=1)  # another head size: re-initialised
    torch.save(source.state_dict(), tmp_path / "resnet20.pt")
    model = {
        "model": "resnet20",
        "pretrained": str(tmp_path / "resnet20.pt"),
        "optimizer": {"name": "sgd", "lr": 0.1, "layer_decay": 0.5},
        "scheduler": {"name": "constant"},
    }
    unfreezing = {
        "class_path": "lightning_tricks.callbacks.GradualUnfreezing",
        "init_args": {"schedule": {1: "layer3"}, "train_bn": False},
    }
    with pytest.warns(UserWarning, match="re-initialised"):
        cli = build_cli(["fit", "--config", write_digits_recipe_config(tmp_path, model, [unfreezing])])
    trained = cli.model.net.state_dict()
    for key, value in source.state_dict().items():
        if key.startswith(("stem", "layer1", "layer2")):  # frozen all along: still the file's values
            assert torch.equal(trained[key], value), key
        elif key.startswith("layer3") and key.endswith("conv1.weight"):
            assert not torch.equal(trained[key], value), key
    groups = _groups_by_name(cli)
    assert not any(name.startswith(("stem", "layer1", "layer2")) for name in groups)
    assert groups["layer3.0.conv1.weight"]["lr"] == pytest.approx(0.05)
    assert groups["classifier.weight"]["lr"] == pytest.approx(0.1)


def test_yaml_fine_tune_on_a_timm_model_ends_with_timms_layer_decayed_lrs(tmp_path):
    model = {
        "model": "timm/test_resnet",
        "optimizer": {"name": "adamw", "lr": 0.001, "layer_decay": 0.8},
        "scheduler": {"name": "constant"},
    }
    fine_tune = {"class_path": "lightning_tricks.callbacks.FineTune", "init_args": {"freeze_epochs": 1}}
    cli = build_cli(["fit", "--config", write_digits_recipe_config(tmp_path, model, [fine_tune])])
    reference = param_groups_layer_decay(cli.model.net, weight_decay=0.0, layer_decay=0.8)
    scale = {id(p): g["lr_scale"] for g in reference for p in g["params"]}
    optimizer = cli.trainer.optimizers[0]
    in_optimizer = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert set(in_optimizer) == {id(p) for p in cli.model.net.parameters()}
    for name, param in cli.model.net.named_parameters():
        assert in_optimizer[id(param)] == pytest.approx(0.001 * scale[id(param)]), name


def test_yaml_multi_stage_linear_probe_on_a_pretrained_timm_backbone(tmp_path):
    backbone = create_model("timm/test_resnet", num_classes=10, in_channels=1)
    torch.save(backbone.state_dict(), tmp_path / "test_resnet.pt")
    model = {
        "model": "linear_probe",
        "model_kwargs": {
            "backbone": "timm/test_resnet",
            "stages": ["layer2", "layer4"],
            "backbone_pretrained": str(tmp_path / "test_resnet.pt"),
            "input_size": 8,
        },
    }
    cli = build_cli(["fit", "--config", write_digits_recipe_config(tmp_path, model)])
    probe = cli.model.net
    assert probe.classifier.in_features == 48 + 96  # test_resnet: layer2 and layer4 widths
    kept = probe.backbone.state_dict()
    for key, value in backbone.state_dict().items():
        if key in kept:
            assert torch.equal(kept[key], value), key  # frozen: weights and BatchNorm statistics
    assert set(_groups_by_name(cli)) == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.init_args.optimizer.layer_decay=0"], "optimizer.layer_decay must be in (0, 1]"),
        (["--model.init_args.model=timm/resnet81"], "did you mean timm/resnet18"),
        (
            ["--model.init_args.pretrained=/no/such.pt"],
            "model.init_args.pretrained='/no/such.pt' is not a file",
        ),
    ],
)
def test_yaml_bad_transfer_options_fail_early_naming_key_and_value(tmp_path, args, expected):
    config = write_digits_recipe_config(tmp_path, {"model": "resnet20"})
    assert expected in run_cli(["fit", "--config", config, *args])
