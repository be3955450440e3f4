import copy

import pytest
import torch
from torch import nn

from lightning_tricks.recipes.optim import (
    DeltaBarDelta,
    OptimizerConfig,
    build_optimizer,
    param_groups,
)


class MixedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, bias=True)
        self.bn = nn.BatchNorm2d(8)
        self.conv_nobias = nn.Conv2d(8, 8, 3, bias=False)
        self.gn = nn.GroupNorm(2, 8)
        self.ln = nn.LayerNorm(8)
        self.fc = nn.Linear(8, 4)
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.scale = nn.Parameter(torch.ones(3))  # 1-D but neither a bias nor a norm parameter


def test_no_decay_group_is_exactly_norm_and_bias() -> None:
    model = MixedNet()
    expected_no_decay = {
        id(model.conv.bias),
        id(model.bn.weight),
        id(model.bn.bias),
        id(model.gn.weight),
        id(model.gn.bias),
        id(model.ln.weight),
        id(model.ln.bias),
        id(model.fc.bias),
    }
    expected_decay = {
        id(model.conv.weight),
        id(model.conv_nobias.weight),
        id(model.fc.weight),
        id(model.scale),
    }
    groups = param_groups(model, weight_decay=0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    assert {id(p) for p in groups[0]["params"]} == expected_decay
    assert {id(p) for p in groups[1]["params"]} == expected_no_decay
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(expected_decay | expected_no_decay)


def test_param_groups_single_group_and_empty_groups_omitted() -> None:
    model = MixedNet()
    (single,) = param_groups(model, 0.1, exclude_norm_and_bias=False)
    assert len(single["params"]) == 12 and single["weight_decay"] == 0.1
    (only_no_decay,) = param_groups(nn.BatchNorm1d(3), 0.1)
    assert only_no_decay["weight_decay"] == 0.0


def test_build_optimizer_applies_decay_split_and_kwargs() -> None:
    model = MixedNet()
    opt = build_optimizer(
        model, OptimizerConfig(name="adamw", lr=1e-3, weight_decay=0.05, kwargs={"amsgrad": True})
    )
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    assert all(g["amsgrad"] for g in opt.param_groups)
    for name, cls in [
        ("sgd", torch.optim.SGD),
        ("adagrad", torch.optim.Adagrad),
        ("adadelta", torch.optim.Adadelta),
        ("rmsprop", torch.optim.RMSprop),
        ("adam", torch.optim.Adam),
        ("delta_bar_delta", DeltaBarDelta),
    ]:
        assert type(build_optimizer(model, OptimizerConfig(name=name, lr=0.01))) is cls


@pytest.mark.parametrize(
    ("base", "global_bs", "expected"), [(256, 1024, 0.4), (256, 64, 0.025), (None, 1024, 0.1)]
)
def test_linear_scaling_rule(base: int | None, global_bs: int, expected: float) -> None:
    opt = build_optimizer(
        nn.Linear(2, 2), OptimizerConfig(lr=0.1, base_batch_size=base), global_batch_size=global_bs
    )
    assert all(g["lr"] == pytest.approx(0.1 * global_bs / base if base else 0.1) for g in opt.param_groups)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "lbfgs"}, "optimizer.name"),
        ({"lr": -0.1}, "optimizer.lr"),
        ({"lr": 0.0}, "optimizer.lr"),
        ({"weight_decay": -1e-4}, "optimizer.weight_decay"),
        ({"momentum": 1.0}, "optimizer.momentum"),
        ({"base_batch_size": 0}, "optimizer.base_batch_size"),
        ({"eps": 0.0}, "optimizer.eps"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        OptimizerConfig(**kwargs)


def test_unknown_optimizer_lists_valid_names() -> None:
    with pytest.raises(ValueError, match=r"adamw.*delta_bar_delta"):
        OptimizerConfig(name="nadam")


def _step_with_grad(opt: torch.optim.Optimizer, p: nn.Parameter, grad: list[float]) -> None:
    p.grad = torch.tensor(grad)
    opt.step()


def test_delta_bar_delta_gain_rule_by_hand() -> None:
    w0 = torch.tensor([1.0, 1.0, 1.0, 1.0])
    p = nn.Parameter(w0.clone())
    lr = 0.1
    opt = DeltaBarDelta([p], lr=lr, increase=0.05, decrease=0.95)
    g1 = torch.tensor([1.0, -1.0, 2.0, 0.0])
    g2 = torch.tensor([3.0, 1.0, -2.0, 5.0])  # agree, flip, flip, no previous sign
    _step_with_grad(opt, p, g1.tolist())
    assert torch.equal(opt.state[p]["gain"], torch.ones(4))  # no previous gradient yet
    w1 = w0 - lr * 1.0 * g1
    assert torch.allclose(p.detach(), w1)
    _step_with_grad(opt, p, g2.tolist())
    gain2 = torch.tensor([1.05, 0.95, 0.95, 1.0])
    assert torch.allclose(opt.state[p]["gain"], gain2)
    assert torch.allclose(p.detach(), w1 - lr * gain2 * g2)
    g3 = torch.tensor([1.0, 1.0, -1.0, 1.0])  # agree, agree, agree, agree
    _step_with_grad(opt, p, g3.tolist())
    assert torch.allclose(opt.state[p]["gain"], torch.tensor([1.10, 1.0, 1.0, 1.05]))


def test_delta_bar_delta_gains_are_clipped_and_momentum_accumulates() -> None:
    p = nn.Parameter(torch.zeros(1))
    opt = DeltaBarDelta([p], lr=1.0, increase=0.5, max_gain=2.0, momentum=0.5)
    for _ in range(5):
        _step_with_grad(opt, p, [1.0])
    assert opt.state[p]["gain"].item() == 2.0
    # v1 = 1; v2 = 0.5 + 1.5; v3 = 1 + 2; v4 = 1.5 + 2; v5 = 1.75 + 2  (gains 1, 1.5, 2, 2, 2)
    assert p.item() == pytest.approx(-(1 + 2 + 3 + 3.5 + 3.75))


def test_delta_bar_delta_minimises_a_quadratic() -> None:
    torch.manual_seed(0)
    scales = torch.tensor([1.0, 10.0, 0.1])
    p = nn.Parameter(torch.tensor([3.0, -2.0, 5.0]))
    opt = DeltaBarDelta([p], lr=0.05, momentum=0.5)
    start = (scales * p.detach() ** 2).sum().item()
    for _ in range(300):
        opt.zero_grad()
        loss = (scales * p**2).sum()
        loss.backward()
        opt.step()
    assert (scales * p.detach() ** 2).sum().item() < 1e-4 * start


def test_delta_bar_delta_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    opt = DeltaBarDelta(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def train_step(m: nn.Module, o: torch.optim.Optimizer) -> None:
        o.zero_grad()
        nn.functional.mse_loss(m(x), y).backward()
        o.step()

    for _ in range(3):
        train_step(model, opt)
    clone = nn.Linear(4, 2)
    clone.load_state_dict(model.state_dict())
    opt2 = DeltaBarDelta(clone.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    opt2.load_state_dict(copy.deepcopy(opt.state_dict()))  # as if read back from a checkpoint file
    for key in ("gain", "prev_grad", "momentum_buffer"):
        assert torch.equal(opt2.state[clone.weight][key], opt.state[model.weight][key])
    train_step(model, opt)
    train_step(clone, opt2)
    assert torch.equal(model.weight, clone.weight) and torch.equal(model.bias, clone.bias)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"lr": 0.0},
        {"decrease": 1.5},
        {"increase": -0.1},
        {"min_gain": 0.0},
        {"max_gain": 0.5},
        {"momentum": 1.0},
    ],
)
def test_delta_bar_delta_validates_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        DeltaBarDelta([nn.Parameter(torch.zeros(1))], **kwargs)


def _quadratic_run(config: OptimizerConfig, update, steps: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise ``||A w - b||^2`` for ``steps`` steps with the built optimizer and with ``update``
    (``update(w, grad, state) -> new w``, the rule written out); return both final weights."""
    gen = torch.Generator().manual_seed(0)
    a, b = (
        torch.randn(8, 4, generator=gen, dtype=torch.float64),
        torch.randn(8, generator=gen, dtype=torch.float64),
    )
    w0 = torch.randn(4, generator=gen, dtype=torch.float64)

    def grad_at(w: torch.Tensor) -> torch.Tensor:
        return 2 * a.T @ (a @ w - b)

    param = nn.Parameter(w0.clone())
    opt = build_optimizer(nn.ParameterList([param]), config)
    w, state = w0.clone(), {}
    for _ in range(steps):
        param.grad = grad_at(param.detach())
        opt.step()
        w = update(w, grad_at(w), state)
    return param.detach(), w


def test_rmsprop_defaults_are_the_lectures_momentum_free_rmsprop() -> None:
    config = OptimizerConfig(name="rmsprop")
    assert (config.lr, config.momentum, config.eps) == (0.01, 0.0, 1e-8)

    def rmsprop(w, g, state, lr=0.01, decay=0.99, eps=1e-8):
        # cache = decay * cache + (1 - decay) * g^2;  w -= lr * g / (sqrt(cache) + eps)
        state["cache"] = decay * state.get("cache", torch.zeros_like(w)) + (1 - decay) * g**2
        return w - lr * g / (state["cache"].sqrt() + eps)

    built, by_hand = _quadratic_run(config, rmsprop)
    assert torch.allclose(built, by_hand, rtol=1e-10, atol=1e-12)


def test_adadelta_defaults_are_zeilers_rule_without_a_learning_rate() -> None:
    config = OptimizerConfig(name="adadelta")
    assert (config.lr, config.eps) == (1.0, 1e-6)

    def adadelta(w, g, state, rho=0.95, eps=1e-6):
        # Zeiler (2012), Algorithm 1
        state["g2"] = rho * state.get("g2", torch.zeros_like(w)) + (1 - rho) * g**2
        dx = -((state.get("dx2", torch.zeros_like(w)) + eps).sqrt() / (state["g2"] + eps).sqrt()) * g
        state["dx2"] = rho * state.get("dx2", torch.zeros_like(w)) + (1 - rho) * dx**2
        return w + dx

    built, by_hand = _quadratic_run(config, adadelta)
    assert torch.allclose(built, by_hand, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(built, _quadratic_run(OptimizerConfig(name="adadelta", lr=0.1), adadelta)[0])


def test_delta_bar_delta_default_has_no_momentum() -> None:
    config = OptimizerConfig(name="delta_bar_delta")
    assert (config.lr, config.momentum) == (0.01, 0.0)

    def delta_bar_delta(w, g, state, lr=0.01, up=0.05, down=0.95):
        # gains grow additively while the gradient keeps its sign, shrink multiplicatively on a flip
        gain, prev = state.get("gain", torch.ones_like(w)), state.get("prev", torch.zeros_like(w))
        agree = g * prev
        gain = torch.where(agree > 0, gain + up, torch.where(agree < 0, gain * down, gain)).clamp(0.01, 100.0)
        state["gain"], state["prev"] = gain, g
        return w - lr * gain * g

    built, by_hand = _quadratic_run(config, delta_bar_delta)
    assert torch.allclose(built, by_hand, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"name": "adam", "momentum": 0.9},
            r"optimizer\.momentum=0\.9 does not apply to optimizer\.name='adam'",
        ),
        ({"name": "sgd", "eps": 1e-8}, r"optimizer\.eps=1e-08 does not apply to optimizer\.name='sgd'"),
    ],
)
def test_options_an_optimizer_does_not_have_are_rejected(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(**kwargs)
