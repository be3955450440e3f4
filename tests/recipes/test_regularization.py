import pytest
import torch
from torch import nn

from lightning_tricks.recipes.regularization import (
    RegularizationConfig,
    classification_loss,
    penalty,
    smooth_targets,
)


def known_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.0, -1.5]]))
        model[0].bias.copy_(torch.tensor([4.0, -4.0]))
        model[1].weight.copy_(torch.tensor([2.0, 2.0]))
        model[1].bias.copy_(torch.tensor([1.0, -1.0]))
    return model


# weights: |w| sum = 1+2+3+0.5+0+1.5 = 8, w^2 sum = 1+4+9+0.25+0+2.25 = 16.5
# biases and BN: |.| sum = 4+4+2+2+1+1 = 14, squares = 16+16+4+4+1+1 = 42
@pytest.mark.parametrize(
    ("l1", "l2", "include", "expected"),
    [
        (0.0, 0.1, False, 0.05 * 16.5),
        (0.01, 0.0, False, 0.01 * 8),
        (0.01, 0.1, False, 0.01 * 8 + 0.05 * 16.5),
        (0.01, 0.1, True, 0.01 * (8 + 14) + 0.05 * (16.5 + 42)),
        (0.0, 0.0, False, 0.0),
    ],
)
def test_penalty_matches_formula(l1: float, l2: float, include: bool, expected: float) -> None:
    value = penalty(known_model(), l1=l1, l2=l2, include_norm_and_bias=include)
    assert value.ndim == 0
    assert value.item() == pytest.approx(expected)


def test_penalty_gradient_is_l2_w_plus_l1_sign() -> None:
    model = known_model()
    penalty(model, l1=0.01, l2=0.1).backward()
    w = model[0].weight.detach()
    assert torch.allclose(model[0].weight.grad, 0.1 * w + 0.01 * torch.sign(w))
    assert model[0].bias.grad is None and model[1].weight.grad is None


def test_uniform_smoothing_c4_eps02() -> None:
    q = smooth_targets(torch.tensor([0, 3]), num_classes=4, eps=0.2, convention="uniform")
    expected = torch.tensor([[0.85, 0.05, 0.05, 0.05], [0.05, 0.05, 0.05, 0.85]])
    assert torch.allclose(q, expected)


def test_off_target_smoothing_c4_eps02() -> None:
    q = smooth_targets(torch.tensor([1, 2]), num_classes=4, eps=0.2, convention="off_target")
    third = 0.2 / 3
    expected = torch.tensor([[third, 0.8, third, third], [third, third, 0.8, third]])
    assert torch.allclose(q, expected)


def test_soft_targets_are_smoothed() -> None:
    t = torch.tensor([[0.6, 0.4, 0.0, 0.0]])
    uniform = smooth_targets(t, 4, 0.2, "uniform")
    assert torch.allclose(uniform, torch.tensor([[0.8 * 0.6 + 0.05, 0.8 * 0.4 + 0.05, 0.05, 0.05]]))
    off = smooth_targets(t, 4, 0.2, "off_target")
    expected = torch.tensor([[0.48 + 0.2 * 0.4 / 3, 0.32 + 0.2 * 0.6 / 3, 0.2 / 3, 0.2 / 3]])
    assert torch.allclose(off, expected)
    assert torch.allclose(off.sum(1), torch.ones(1))


def manual_ce(logits: torch.Tensor, q: torch.Tensor) -> float:
    total = 0.0
    for row, qrow in zip(logits.tolist(), q.tolist(), strict=True):
        log_z = torch.logsumexp(torch.tensor(row, dtype=torch.float64), 0).item()
        total += -sum(qi * (zi - log_z) for zi, qi in zip(row, qrow, strict=True))
    return total / len(logits)


def test_soft_target_cross_entropy_matches_manual() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    q = torch.softmax(torch.randn(5, 4), 1)
    assert classification_loss(logits, q).item() == pytest.approx(manual_ce(logits, q), rel=1e-5)


@pytest.mark.parametrize("convention", ["uniform", "off_target"])
def test_smoothed_index_loss_matches_manual(convention: str) -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 4)
    y = torch.tensor([0, 1, 2, 3, 1, 2])
    eps = 0.2
    q = torch.full((6, 4), eps / 4 if convention == "uniform" else eps / 3)
    q[torch.arange(6), y] = 1 - eps + (eps / 4 if convention == "uniform" else 0.0)
    loss = classification_loss(logits, y, label_smoothing=eps, convention=convention)
    assert loss.item() == pytest.approx(manual_ce(logits, q), rel=1e-5)


def test_unsmoothed_loss_is_plain_cross_entropy() -> None:
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    expected = -(2.0 - torch.logsumexp(logits[0], 0).item())
    assert classification_loss(logits, torch.tensor([0]), convention="off_target").item() == pytest.approx(
        expected
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"l2": -1e-4}, "regularization.l2"),
        ({"l1": -1.0}, "regularization.l1"),
        ({"label_smoothing": 1.0}, "regularization.label_smoothing"),
        ({"dropout": 1.0}, "regularization.dropout"),
        ({"dropout": -0.1}, "regularization.dropout"),
        ({"drop_connect": 1.5}, "regularization.drop_connect"),
        ({"label_smoothing_convention": "two_hot"}, "regularization.label_smoothing_convention"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        RegularizationConfig(**kwargs)
