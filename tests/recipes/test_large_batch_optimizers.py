"""LARS and LAMB (timm's, built by the recipe) against their papers' updates written out here."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from lightning_tricks.recipes.optim import OPTIMIZER_DEFAULTS, OptimizerConfig, build_optimizer

STEPS = 6


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.BatchNorm1d(5), nn.Linear(5, 3))


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 6, generator=generator), torch.randint(0, 3, (16,), generator=generator)


def _gradients(model: nn.Module, step: int) -> None:
    model.zero_grad(set_to_none=True)
    x, y = _batch(step)
    F.cross_entropy(model(x), y).backward()


def _is_weight(name: str) -> bool:
    """Weights of the linear layers: decayed and trust-ratio adapted; BatchNorm parameters and biases not."""
    return name.endswith("weight") and not name.startswith("2.")


def _run_recipe(config: OptimizerConfig) -> nn.Module:
    model = _net()
    optimizer = build_optimizer(model, config)
    for step in range(STEPS):
        _gradients(model, step)
        optimizer.step()
    return model


def test_lars_matches_the_trust_ratio_update_of_you_et_al_2017() -> None:
    lr, wd, momentum, eta, eps = 0.5, 1e-3, 0.9, 1e-3, 1e-8
    model = _run_recipe(OptimizerConfig(name="lars", lr=lr, weight_decay=wd))
    reference = _net()
    velocity: dict[str, torch.Tensor] = {}
    for step in range(STEPS):
        _gradients(reference, step)
        with torch.no_grad():
            for name, w in reference.named_parameters():
                g = w.grad
                if _is_weight(name):
                    # local lr = eta * ||w|| / (||g|| + wd * ||w||), applied to g + wd * w
                    local = eta * w.norm() / (g.norm() + wd * w.norm() + eps)
                    update = local * (g + wd * w)
                else:
                    update = g.clone()  # no decay, no adaptation
                velocity[name] = update if name not in velocity else momentum * velocity[name] + update
                w -= lr * velocity[name]
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)
    # the trust ratio makes a difference: plain momentum SGD ends elsewhere
    sgd = _run_recipe(OptimizerConfig(name="sgd", lr=lr, weight_decay=wd, momentum=momentum))
    assert not torch.allclose(sgd[0].weight, model[0].weight, atol=1e-4)


@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_lamb_matches_algorithm_2_of_you_et_al_2020(wd: float) -> None:
    lr, (beta1, beta2), eps = 0.01, (0.9, 0.999), 1e-6
    model = _run_recipe(OptimizerConfig(name="lamb", lr=lr, weight_decay=wd))
    reference = _net()
    m = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in reference.named_parameters()}
    for step in range(1, STEPS + 1):
        _gradients(reference, step - 1)
        with torch.no_grad():
            for name, w in reference.named_parameters():
                g = w.grad
                m[name] = beta1 * m[name] + (1 - beta1) * g
                v[name] = beta2 * v[name] + (1 - beta2) * g * g
                m_hat, v_hat = m[name] / (1 - beta1**step), v[name] / (1 - beta2**step)
                r = m_hat / (v_hat.sqrt() + eps)
                if _is_weight(name):
                    u = r + wd * w
                    w -= lr * (w.norm() / u.norm()) * u  # layer-wise trust ratio ||w|| / ||r + wd w||
                else:
                    w -= lr * r
    for (name, got), (_, want) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=name)


def test_lars_and_lamb_defaults_and_decay_grouping() -> None:
    model = _net()
    lars = build_optimizer(model, OptimizerConfig(name="lars", weight_decay=5e-4))
    lamb = build_optimizer(model, OptimizerConfig(name="lamb", weight_decay=0.01))
    assert type(lars).__name__ == "Lars" and type(lamb).__name__ == "Lamb"
    assert OPTIMIZER_DEFAULTS["lars"] == {"lr": 1.0, "momentum": 0.9, "eps": 1e-8}
    assert [(g["lr"], g["momentum"], g["weight_decay"], g["always_adapt"]) for g in lars.param_groups] == [
        (1.0, 0.9, 5e-4, True),
        (1.0, 0.9, 0.0, False),
    ]
    assert [(g["lr"], g["eps"], g["weight_decay"], g["always_adapt"]) for g in lamb.param_groups] == [
        (1e-3, 1e-6, 0.01, True),
        (1e-3, 1e-6, 0.0, False),
    ]
    assert lamb.defaults["max_grad_norm"] is None  # the paper's LAMB: no global clipping inside
    # without the split every parameter is decayed and adapted
    single = build_optimizer(model, OptimizerConfig(name="lamb", exclude_norm_and_bias_from_decay=False))
    assert [g["always_adapt"] for g in single.param_groups] == [True]
    user = build_optimizer(model, OptimizerConfig(name="lars", kwargs={"always_adapt": False}))
    assert all("always_adapt" not in g or not g["always_adapt"] for g in user.param_groups)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "lamb", "momentum": 0.9}, "optimizer.momentum=0.9 does not apply to optimizer.name='lamb'"),
        (
            {"name": "lars", "kwargs": {"trust_coeff": 0}},
            r"optimizer.kwargs.trust_coeff must be a number > 0",
        ),
        (
            {"name": "lamb", "kwargs": {"max_grad_norm": -1.0}},
            "optimizer.kwargs.max_grad_norm must be null or",
        ),
        ({"name": "lamb", "kwargs": {"nesterov": True}}, "does not accept"),
        ({"name": "adam", "nesterov": True}, "nesterov=True needs optimizer.name='sgd' or 'lars'"),
    ],
)
def test_bad_lars_lamb_settings_name_the_key(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)


def test_missing_timm_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "timm.optim", None)  # as if timm were not installed
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(
        ModuleNotFoundError, match=r"optimizer.name='lars'.*pip install 'lightning-tricks\[timm\]'"
    ):
        OptimizerConfig(name="lars")
    copy.deepcopy(OptimizerConfig(name="sgd"))  # the core optimizers never import timm
