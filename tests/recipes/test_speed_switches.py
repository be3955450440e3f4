"""Speed switches of ImageClassifier: channels_last, torch.compile and per-kind LR multipliers."""

from __future__ import annotations

import shutil

import pytest
import torch
from speed_setups import one_step_loss_and_grads
from torch import nn

from lightning_tricks.recipes import ImageClassifier, OptimizerConfig
from lightning_tricks.recipes.optim import build_optimizer


def test_channels_last_changes_the_layout_but_not_the_loss_or_gradients():
    model = ImageClassifier("small_cnn", num_classes=4, in_channels=3, channels_last=True)
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not conv.weight.is_contiguous()
    plain_loss, plain_grads = one_step_loss_and_grads()
    loss, grads = one_step_loss_and_grads(channels_last=True)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-5, atol=1e-6)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="inductor needs a C compiler"
)
def test_compiled_network_gives_the_plain_loss_and_keeps_the_state_dict_keys():
    plain_loss, plain_grads = one_step_loss_and_grads()
    loss, grads = one_step_loss_and_grads(compile="default")
    torch.testing.assert_close(loss, plain_loss, rtol=1e-4, atol=1e-5)
    for grad, plain in zip(grads, plain_grads, strict=True):
        torch.testing.assert_close(grad, plain, rtol=1e-3, atol=1e-5)
    compiled = ImageClassifier("small_cnn", num_classes=4, in_channels=3, compile="default")
    plain = ImageClassifier("small_cnn", num_classes=4, in_channels=3)
    assert list(compiled.state_dict()) == list(plain.state_dict())


def test_unknown_compile_mode_fails_early():
    with pytest.raises(ValueError, match=r"compile must be None .* got 'fast'"):
        ImageClassifier("small_cnn", compile="fast")


def test_norm_bias_lr_multiplier_gets_its_own_param_group():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    config = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9, lr_multipliers={"norm_bias": 64})
    optimizer = build_optimizer(net, config)
    by_lr = {}
    for group in optimizer.param_groups:
        by_lr.setdefault(group["lr"], set()).update(id(p) for p in group["params"])
    assert by_lr[0.05 * 64] == {id(net[1].bias)}
    others = {id(p) for p in net.parameters()} - {id(net[1].bias)}
    assert by_lr[0.05] == others
    # The BatchNorm bias keeps the no-decay setting of the group it came from.
    (norm_group,) = [g for g in optimizer.param_groups if g["lr"] == 0.05 * 64]
    assert norm_group["weight_decay"] == 0.0


def test_lr_multiplier_ratio_survives_a_schedule_step():
    net = nn.Sequential(nn.Linear(3, 3), nn.LayerNorm(3))
    optimizer = build_optimizer(net, OptimizerConfig(name="sgd", lr=0.1, lr_multipliers={"bias": 4}))
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    optimizer.step()
    scheduler.step()
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    assert lr_of[id(net[0].weight)] == pytest.approx(0.05)
    assert lr_of[id(net[1].weight)] == pytest.approx(0.05)  # a norm weight is not a bias
    assert lr_of[id(net[0].bias)] == lr_of[id(net[1].bias)] == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("multipliers", "match"),
    [
        ({"norm_biases": 64}, "unknown kind 'norm_biases'"),
        ({"bias": 0}, "lr_multipliers.bias must be a positive"),
    ],
)
def test_bad_lr_multipliers_fail_early(multipliers, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(lr_multipliers=multipliers)
