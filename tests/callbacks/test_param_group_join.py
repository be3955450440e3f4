"""Param groups added to a running schedule get the lr they would have had if present from the start."""

from __future__ import annotations

import pytest
import torch

from lightning_tricks.callbacks._param_group_join import add_param_groups
from lightning_tricks.recipes.schedules import SchedulerConfig, build_scheduler

SCHEDULES = [
    SchedulerConfig(name="cosine", interval="step"),
    SchedulerConfig(name="cosine", interval="step", warmup=4),
    SchedulerConfig(name="one_cycle", interval="step"),
    SchedulerConfig(name="step", interval="step", kwargs={"step_size": 3}),
    SchedulerConfig(name="cosine_restarts", interval="step", kwargs={"T_0": 4, "cycle_decay": 0.5}),
    SchedulerConfig(name="inverse_time", interval="step", kwargs={"decay_rate": 0.3}),
]


def _setup(config: SchedulerConfig, groups: list[dict]):
    optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    return optimizer, build_scheduler(optimizer, config, total_steps=12, steps_per_epoch=12)["scheduler"]


@pytest.mark.parametrize("config", SCHEDULES, ids=lambda c: f"{c.name}-warmup{c.warmup}")
def test_a_joined_group_follows_the_schedule_as_if_it_had_been_there_from_the_start(config):
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    reference, reference_scheduler = _setup(
        config, [{"params": [a], "lr": 0.1}, {"params": [b], "lr": 0.025}]
    )
    optimizer, scheduler = _setup(config, [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 0.1}])
    for step in range(11):
        if step == 5:
            add_param_groups(
                optimizer, [scheduler], [{"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 0.025}]
            )
        if step >= 5:
            got = [g["lr"] for g in optimizer.param_groups]
            assert got == pytest.approx([g["lr"] for g in reference.param_groups]), step
            assert scheduler.get_last_lr() == pytest.approx(reference_scheduler.get_last_lr()), step
        for opt, sched in ((reference, reference_scheduler), (optimizer, scheduler)):
            opt.step()
            sched.step()
