"""Scheduler and optimizer keyword arguments that torch would misuse are refused with the key named."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from lightning_tricks.recipes._validation import check_training_steps, warn_batch_larger_than_data
from lightning_tricks.recipes.optim import OptimizerConfig, build_optimizer
from lightning_tricks.recipes.schedules import SchedulerConfig, build_scheduler


def make_optimizer(lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=lr)


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("exponential", {"gamma": -1.0}, "scheduler.kwargs.gamma"),  # was: gradient ascent
        ("step", {"step_size": 0}, "scheduler.kwargs.step_size"),  # was: ZeroDivisionError in torch
        ("cosine", {"T_max": 0}, "scheduler.kwargs.T_max"),  # was: ZeroDivisionError in torch
        ("one_cycle", {"pct_start": 1.5}, "scheduler.kwargs.pct_start"),
        ("multistep", {"milestones": [3, 1]}, "scheduler.kwargs.milestones"),
        ("cosine_restarts", {"T_0": 2, "T_mult": 0}, "scheduler.kwargs.T_mult"),
        ("plateau", {"factor": 0.0}, "scheduler.kwargs.factor"),
        ("cyclic", {"base_lr": -0.1}, "scheduler.kwargs.base_lr"),
        ("cosine", {"eta_min": float("nan")}, "scheduler.kwargs.eta_min"),
    ],
)
def test_out_of_range_scheduler_kwarg_names_key_range_and_example(name, kwargs, key):
    escaped = re.escape(key)
    with pytest.raises(ValueError, match=rf"{escaped} must be .*got .*; e\.g\. {escaped}="):
        SchedulerConfig(name=name, interval="step", kwargs=kwargs)


def test_valid_exponential_gamma_still_decays_like_torch():
    config = SchedulerConfig(name="exponential", interval="step", kwargs={"gamma": 0.5})
    optimizer = make_optimizer()
    scheduler = build_scheduler(optimizer, config, total_steps=10, steps_per_epoch=5)["scheduler"]
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)


def test_step_schedule_that_never_triggers_is_warned_about():
    config = SchedulerConfig(name="step", interval="epoch", kwargs={"step_size": 50})
    with pytest.warns(UserWarning, match=r"step_size=50 never triggers.*lasts 8 epochs.*step_size=2"):
        build_scheduler(make_optimizer(), config, total_steps=80, steps_per_epoch=10)
    late = SchedulerConfig(name="multistep", interval="epoch", kwargs={"milestones": [9, 12]})
    with pytest.warns(UserWarning, match=r"milestones=\[9, 12\] never trigger"):
        build_scheduler(make_optimizer(), late, total_steps=80, steps_per_epoch=10)
    # one milestone inside the run is a working schedule: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_scheduler(
            make_optimizer(), SchedulerConfig("multistep", kwargs={"milestones": [4, 12]}), 80, 10
        )


def test_zero_step_run_names_the_budget_keys():
    with pytest.raises(ValueError, match=r"no optimizer steps.*trainer\.limit_train_batches"):
        build_scheduler(make_optimizer(), SchedulerConfig(name="cosine"), total_steps=0, steps_per_epoch=0)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("sgd", {"dampening": 2}, r"optimizer\.kwargs\.dampening must be a number in \[0, 1\]"),
        ("sgd", {"lr": -1}, r"optimizer\.kwargs\.lr must be a number > 0"),
        ("rmsprop", {"alpha": 1.5}, r"optimizer\.kwargs\.alpha"),
        ("adam", {"betas": [0.9, 1.0]}, r"optimizer\.kwargs\.betas"),
        ("delta_bar_delta", {"max_gain": 0.5}, r"optimizer\.kwargs\.max_gain must be a number >= 1"),
        ("sgd", {"betas": [0.9, 0.99]}, r"optimizer\.kwargs has \['betas'\].*valid: \[.*'dampening'"),
    ],
)
def test_bad_optimizer_kwarg_names_key(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        OptimizerConfig(name=name, kwargs=kwargs)


def test_valid_optimizer_kwargs_reach_torch():
    config = OptimizerConfig(name="sgd", momentum=0.9, kwargs={"dampening": 0.5})
    optimizer = build_optimizer(torch.nn.Linear(2, 1), config)
    assert optimizer.param_groups[0]["dampening"] == 0.5


@pytest.mark.parametrize(
    ("size", "drop_last", "match"),
    [
        (10, True, r"10 samples, batch_size=64 and drop_last=True.*drop_last=False.*batch_size=10"),
        (0, False, r"the training split is empty"),
    ],
)
def test_zero_batches_name_the_data_size_batch_size_and_fix(size, drop_last, match):
    data = torch.utils.data.TensorDataset(torch.zeros(size, 2))
    loader = torch.utils.data.DataLoader(data, batch_size=64, drop_last=drop_last)
    assert len(loader) == 0  # what Lightning counts as the epoch's batches
    with pytest.raises(ValueError, match=match):
        check_training_steps(total_steps=100, steps_per_epoch=len(loader), loader=loader)
    check_training_steps(100, len(torch.utils.data.DataLoader(torch.zeros(10, 2), batch_size=64)), loader)


def test_a_batch_larger_than_the_training_data_is_warned_about():
    data = torch.zeros(10, 2)
    expected = r"batch_size=64 is larger than the 10 training samples.*batch_size=10"
    with pytest.warns(UserWarning, match=expected):
        warn_batch_larger_than_data(torch.utils.data.DataLoader(data, batch_size=64))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_batch_larger_than_data(torch.utils.data.DataLoader(data, batch_size=10))  # one full batch
        # with drop_last there is no batch at all: check_training_steps raises instead
        warn_batch_larger_than_data(torch.utils.data.DataLoader(data, batch_size=64, drop_last=True))
