import copy
import math

import pytest
import torch
from torch import nn

from lightning_tricks.recipes.schedules import (
    LinearWarmup,
    SchedulerConfig,
    build_scheduler,
    check_resumed_length,
    scheduler_cycle_ends,
)

BASE = 0.1


def make_optimizer(lr: float = BASE) -> torch.optim.Optimizer:
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr, momentum=0.9)


def lr_trace(
    config: SchedulerConfig, n: int, total_steps: int = 100, steps_per_epoch: int = 1
) -> list[float]:
    """lr used by optimizer steps 0..n-1, stepping the scheduler by hand after each."""
    opt = make_optimizer()
    sched = build_scheduler(opt, config, total_steps=total_steps, steps_per_epoch=steps_per_epoch)[
        "scheduler"
    ]
    lrs = []
    for _ in range(n):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def assert_trace(actual: list[float], expected: list[float]) -> None:
    assert actual == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_constant_without_warmup_is_none() -> None:
    assert build_scheduler(make_optimizer(), SchedulerConfig(), 100, 10) is None
    assert build_scheduler(make_optimizer(), SchedulerConfig("constant"), 100, 10) is None


def test_constant_with_warmup() -> None:
    lrs = lr_trace(SchedulerConfig(warmup=4, warmup_start_factor=0.2), 8)
    assert_trace(lrs, [BASE * (0.2 + 0.8 * min(t, 4) / 4) for t in range(8)])


def test_exponential_closed_form() -> None:
    k = 0.3
    lrs = lr_trace(SchedulerConfig("exponential", kwargs={"decay_rate": k}), 20)
    assert_trace(lrs, [BASE * math.exp(-k * t) for t in range(20)])


def test_inverse_time_closed_form() -> None:
    k = 0.5
    lrs = lr_trace(SchedulerConfig("inverse_time", kwargs={"decay_rate": k}), 20)
    assert_trace(lrs, [BASE / (1 + k * t) for t in range(20)])


def test_step_closed_form() -> None:
    lrs = lr_trace(SchedulerConfig("step", kwargs={"step_size": 3, "gamma": 0.5}), 12)
    assert_trace(lrs, [BASE * 0.5 ** (t // 3) for t in range(12)])


def test_multistep_closed_form() -> None:
    lrs = lr_trace(SchedulerConfig("multistep", kwargs={"milestones": [4, 7]}), 10)
    assert_trace(lrs, [BASE * 0.1 ** sum(t >= m for m in (4, 7)) for t in range(10)])


@pytest.mark.parametrize("eta_min", [0.0, 0.001])
def test_warmup_then_cosine_closed_form(eta_min: float) -> None:
    f, warm, total = 0.1, 5, 30
    config = SchedulerConfig("cosine", warmup=warm, warmup_start_factor=f, kwargs={"eta_min": eta_min})
    lrs = lr_trace(config, total, total_steps=total)

    def closed_form(t: int) -> float:
        if t < warm:
            return BASE * (f + (1 - f) * t / warm)
        return eta_min + (BASE - eta_min) * (1 + math.cos(math.pi * (t - warm) / (total - warm))) / 2

    assert_trace(lrs, [closed_form(t) for t in range(total)])
    assert lrs[warm] == pytest.approx(BASE)


def test_cosine_epoch_interval_counts_epochs() -> None:
    # 200 steps at 20 per epoch = 10 epochs; T_max defaults to the 10 epochs.
    lrs = lr_trace(SchedulerConfig("cosine"), 10, total_steps=200, steps_per_epoch=20)
    assert_trace(lrs, [BASE * (1 + math.cos(math.pi * t / 10)) / 2 for t in range(10)])


def test_cosine_restarts_closed_form() -> None:
    t0, t_mult, eta_min = 3, 2, 0.01
    lrs = lr_trace(
        SchedulerConfig("cosine_restarts", kwargs={"T_0": t0, "T_mult": t_mult, "eta_min": eta_min}), 21
    )

    def closed_form(t: int) -> float:
        period, t_cur = t0, t
        while t_cur >= period:
            t_cur -= period
            period *= t_mult
        return eta_min + (BASE - eta_min) * (1 + math.cos(math.pi * t_cur / period)) / 2

    assert_trace(lrs, [closed_form(t) for t in range(21)])


def test_step_interval_and_steps_per_epoch_do_not_mix() -> None:
    config = SchedulerConfig("step", interval="step", kwargs={"step_size": 5})
    out = build_scheduler(make_optimizer(), config, total_steps=50, steps_per_epoch=10)
    assert out["interval"] == "step" and out["frequency"] == 1 and "monitor" not in out
    assert_trace(
        lr_trace(config, 12, total_steps=50, steps_per_epoch=10), [BASE * 0.1 ** (t // 5) for t in range(12)]
    )


def test_plateau_after_warmup() -> None:
    warm, f, factor, patience = 3, 0.5, 0.5, 1
    config = SchedulerConfig(
        "plateau", warmup=warm, warmup_start_factor=f, kwargs={"factor": factor, "patience": patience}
    )
    opt = make_optimizer()
    out = build_scheduler(opt, config, total_steps=100, steps_per_epoch=10)
    assert out["monitor"] == "val/loss" and out["reduce_on_plateau"] is True
    sched = out["scheduler"]
    # Metrics during warm-up are terrible and must be ignored; afterwards 1.0 then no improvement.
    metrics = [9.0, 9.0, 9.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5]
    lrs = []
    for metric in metrics:
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(metric)
    lrs.append(opt.param_groups[0]["lr"])
    # Independent model: warm-up for t < 3; from call 4 on, a reduction after `patience + 1` bad calls.
    expected, lr, best, bad = [], BASE, math.inf, 0
    for t in range(len(metrics) + 1):
        if t < warm:
            expected.append(BASE * (f + (1 - f) * t / warm))
            continue
        expected.append(lr)
        if t < len(metrics) and t >= warm:
            m = metrics[t]
            if m < best * (1 - 1e-4):
                best, bad = m, 0
            else:
                bad += 1
            if bad > patience:
                lr, bad = lr * factor, 0
    assert_trace(lrs, expected)
    assert lrs[-1] < BASE  # the reduction did happen


def test_plateau_without_warmup_is_torch_class() -> None:
    out = build_scheduler(
        make_optimizer(), SchedulerConfig("plateau", monitor="val/acc", kwargs={"mode": "max"}), 10, 1
    )
    assert isinstance(out["scheduler"], torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert out["monitor"] == "val/acc"


def test_one_cycle_and_cyclic_build_and_peak_at_optimizer_lr() -> None:
    lrs = lr_trace(SchedulerConfig("one_cycle", interval="step"), 100, total_steps=100)
    assert max(lrs) == pytest.approx(BASE)
    assert lrs[0] == pytest.approx(BASE / 25)
    lrs = lr_trace(SchedulerConfig("cyclic", warmup=2, kwargs={"step_size_up": 4}), 20, total_steps=20)
    # after warm-up: triangle between BASE/10 and BASE with half-period 4
    assert_trace(lrs[2:], [BASE / 10 + (BASE - BASE / 10) * (1 - abs((t % 8) / 4 - 1)) for t in range(18)])


@pytest.mark.parametrize(
    "config",
    [
        SchedulerConfig("cosine", warmup=3),
        SchedulerConfig("cosine_restarts", warmup=2, kwargs={"T_0": 4}),
        SchedulerConfig("inverse_time", kwargs={"decay_rate": 0.2}),
        SchedulerConfig("one_cycle"),
        SchedulerConfig("plateau", warmup=2, kwargs={"patience": 0}),
    ],
    ids=lambda c: f"{c.name}-w{c.warmup}",
)
def test_state_dict_round_trip_gives_same_next_lr(config: SchedulerConfig) -> None:
    def run(opt: torch.optim.Optimizer, sched: object, n: int, start: int) -> list[float]:
        lrs = []
        for i in range(start, start + n):
            opt.step()
            if config.name == "plateau":
                sched.step(10.0 - 0.1 * (i % 3))
            else:
                sched.step()
            lrs.append(opt.param_groups[0]["lr"])
        return lrs

    opt = make_optimizer()
    sched = build_scheduler(opt, config, total_steps=20, steps_per_epoch=1)["scheduler"]
    run(opt, sched, 4, 0)
    opt_state, sched_state = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())
    expected = run(opt, sched, 6, 4)

    opt2 = make_optimizer()
    sched2 = build_scheduler(opt2, config, total_steps=20, steps_per_epoch=1)["scheduler"]
    opt2.load_state_dict(opt_state)
    sched2.load_state_dict(sched_state)
    assert run(opt2, sched2, 6, 4) == pytest.approx(expected)


def test_linear_warmup_rejects_bad_arguments() -> None:
    opt = make_optimizer()
    main = torch.optim.lr_scheduler.StepLR(opt, 2)
    with pytest.raises(ValueError, match="warmup"):
        LinearWarmup(opt, main, warmup=0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "linear_decay"}, "scheduler.name"),
        ({"warmup": -1}, "scheduler.warmup"),
        ({"interval": "batch"}, "scheduler.interval"),
        ({"warmup_start_factor": 0.0}, "scheduler.warmup_start_factor"),
        ({"name": "step"}, "scheduler.kwargs.step_size"),
        ({"name": "cosine", "kwargs": {"T_maxx": 3}}, "scheduler.kwargs"),
    ],
)
def test_bad_config_names_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        SchedulerConfig(**kwargs)


def test_unknown_name_lists_valid_names_and_warmup_longer_than_run_fails() -> None:
    with pytest.raises(ValueError, match=r"cosine_restarts.*plateau"):
        SchedulerConfig(name="poly")
    with pytest.raises(ValueError, match=r"scheduler\.warmup"):
        build_scheduler(
            make_optimizer(), SchedulerConfig("cosine", warmup=10), total_steps=100, steps_per_epoch=10
        )


@pytest.mark.parametrize("spelling", [None, "none", "None", "null", "constant"])
def test_no_schedule_spellings_mean_constant(spelling):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    config = SchedulerConfig(name=spelling)
    assert config.resolved_name == "constant"
    assert build_scheduler(optimizer, config, total_steps=10, steps_per_epoch=5) is None


def test_snapshot_schedule_is_torch_warm_restarts_with_paper_cycle_length() -> None:
    total, cycles, warm = 43, 4, 3
    config = SchedulerConfig("snapshot", interval="step", warmup=warm, kwargs={"cycles": cycles})
    lrs = lr_trace(config, total, total_steps=total)
    opt = make_optimizer()
    reference = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        opt, T_0=math.ceil((total - warm) / cycles)
    )
    expected = []
    for _ in range(total - warm):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        reference.step()
    assert_trace(lrs[warm:], expected)
    sched = build_scheduler(make_optimizer(), config, total_steps=total, steps_per_epoch=1)["scheduler"]
    assert scheduler_cycle_ends(sched, total) == [warm + e for e in (10, 20, 30, 40)]


def test_snapshot_schedule_that_cannot_fit_names_the_key() -> None:
    config = SchedulerConfig("snapshot", interval="step", kwargs={"cycles": 6})
    with pytest.raises(ValueError, match=r"scheduler\.kwargs\.cycles=6 does not fit in 10 scheduler steps"):
        build_scheduler(make_optimizer(), config, total_steps=10, steps_per_epoch=1)


@pytest.mark.parametrize(
    ("kwargs", "limit"),
    [
        ({"T_0": 4, "T_mult": 2, "cycle_decay": 0.5}, None),
        # 40 - 2 warm-up - 10 cooldown = 28: cycles of 3, 6, 12 end at 3, 9, 21 (the next at 45)
        ({"T_0": 3, "T_mult": 2, "eta_min": 0.01, "cycle_decay": 0.8, "cooldown": 10}, 3),
        # 40 - 2 - 3 = 35: seven cycles of 5
        ({"T_0": 5, "cooldown": 3}, 7),
        # a fractional T_mult alone (torch's class needs an integer): cycles of 4, 6, 9, 13.5 in 38 steps
        ({"T_0": 4, "T_mult": 1.5}, None),
    ],
)
def test_sgdr_options_match_timm_cosine_scheduler(kwargs: dict, limit: int | None) -> None:
    timm_scheduler = pytest.importorskip("timm.scheduler")
    total, warm, f = 40, 2, 0.1
    config = SchedulerConfig("cosine_restarts", warmup=warm, warmup_start_factor=f, kwargs=kwargs)
    lrs = lr_trace(config, total, total_steps=total)
    reference = timm_scheduler.CosineLRScheduler(
        make_optimizer(),
        t_initial=kwargs["T_0"],
        cycle_mul=kwargs.get("T_mult", 1),
        cycle_decay=kwargs.get("cycle_decay", 1.0),
        lr_min=kwargs.get("eta_min", 0.0),
        cycle_limit=limit or 1000,
        warmup_t=warm,
        warmup_lr_init=f * BASE,
        warmup_prefix=True,
        t_in_epochs=False,
    )
    assert_trace(lrs, [reference._get_lr(t)[0] for t in range(total)])
    if "cooldown" in kwargs:  # the last `cooldown` units at eta_min
        assert_trace(lrs[-kwargs["cooldown"] :], [kwargs.get("eta_min", 0.0)] * kwargs["cooldown"])


def test_cosine_restarts_without_sgdr_options_stays_torch_class() -> None:
    out = build_scheduler(make_optimizer(), SchedulerConfig("cosine_restarts", kwargs={"T_0": 4}), 20, 1)
    assert type(out["scheduler"]) is torch.optim.lr_scheduler.CosineAnnealingWarmRestarts


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("snapshot", {"cycles": 0}, r"scheduler\.kwargs\.cycles must be an integer >= 1, got 0"),
        ("snapshot", {}, r"scheduler\.kwargs\.cycles is required"),
        (
            "cosine_restarts",
            {"T_0": 4, "cycle_decay": 0.0},
            r"scheduler\.kwargs\.cycle_decay must be a number in \(0, 1\]",
        ),
        (
            "cosine_restarts",
            {"T_0": 4, "cycle_decay": 1.5},
            r"scheduler\.kwargs\.cycle_decay must be a number in \(0, 1\]",
        ),
        (
            "cosine_restarts",
            {"T_0": 4, "cooldown": -1},
            r"scheduler\.kwargs\.cooldown must be an integer >= 0",
        ),
        ("cosine", {"cycle_decay": 0.5}, r"scheduler\.kwargs has \['cycle_decay'\]"),
    ],
)
def test_restart_options_are_validated(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SchedulerConfig(name, kwargs=kwargs)


def test_cooldown_longer_than_the_cycles_allow_fails() -> None:
    config = SchedulerConfig("cosine_restarts", kwargs={"T_0": 8, "cooldown": 5})
    with pytest.raises(
        ValueError, match=r"scheduler\.kwargs\.cooldown=5 leaves 5 units, less than one cycle"
    ):
        build_scheduler(make_optimizer(), config, total_steps=10, steps_per_epoch=1)


@pytest.mark.parametrize(
    ("name", "kwargs", "decays_at"),
    [
        ("multistep", {"milestones": [6, 9], "gamma": 0.1}, [6, 9]),
        ("step", {"step_size": 4, "gamma": 0.5}, [4, 8, 12]),
    ],
)
def test_step_decay_milestones_count_from_the_start_of_training_with_warmup(name, kwargs, decays_at) -> None:
    warm, f, total = 3, 0.1, 14
    lrs = lr_trace(SchedulerConfig(name, warmup=warm, warmup_start_factor=f, kwargs=kwargs), total, total)
    gamma = kwargs["gamma"]

    def closed_form(t: int) -> float:
        if t < warm:
            return BASE * (f + (1 - f) * t / warm)
        return BASE * gamma ** sum(t >= m for m in decays_at)

    assert_trace(lrs, [closed_form(t) for t in range(total)])


def test_milestone_inside_warmup_fails_naming_the_key() -> None:
    config = SchedulerConfig("multistep", warmup=5, kwargs={"milestones": [5, 9]})
    with pytest.raises(
        ValueError, match=r"scheduler\.kwargs\.milestones puts a decay at \[5\], inside the warm-up"
    ):
        build_scheduler(make_optimizer(), config, total_steps=20, steps_per_epoch=1)


@pytest.mark.parametrize(
    ("config", "refused"),
    [
        (SchedulerConfig("one_cycle", interval="step"), True),
        (SchedulerConfig("cosine", interval="step", warmup=2), True),
        (SchedulerConfig("snapshot", interval="step", kwargs={"cycles": 2}), True),
        (SchedulerConfig("cosine_restarts", interval="step", kwargs={"T_0": 5, "cooldown": 5}), True),
        (SchedulerConfig("cosine", interval="step", kwargs={"T_max": 40}), False),
        (SchedulerConfig("step", interval="step", kwargs={"step_size": 10}), False),
        (SchedulerConfig("constant", interval="step", warmup=5), False),
    ],
    ids=["one_cycle", "cosine", "snapshot", "sgdr_cooldown", "cosine_own_T_max", "step", "warmup_only"],
)
def test_resuming_a_schedule_fitted_to_the_run_into_a_longer_run_is_refused(config, refused) -> None:
    if config.resolved_name == "one_cycle":
        # Why: the checkpoint's state replaces the longer build, and torch fails past the old end.
        opt = make_optimizer()
        old = build_scheduler(opt, config, total_steps=40, steps_per_epoch=20)["scheduler"]
        new = build_scheduler(make_optimizer(), config, total_steps=80, steps_per_epoch=20)["scheduler"]
        new.load_state_dict(old.state_dict())
        with pytest.raises(ValueError, match="total steps"):
            for _ in range(41):
                new.optimizer.step()
                new.step()
    check_resumed_length(config, 40, 40, 20)  # same length: resumes
    check_resumed_length(config, 40, 20, 20)  # shorter: stops early, like max_steps
    if refused:
        with pytest.raises(
            ValueError, match=r"run of 40 optimizer steps, but the resumed run lasts 80.*max_epochs=2"
        ):
            check_resumed_length(config, 40, 80, 20)
    else:
        check_resumed_length(config, 40, 80, 20)


def test_refused_resume_names_the_length_to_keep_in_the_run_units() -> None:
    with pytest.raises(ValueError, match=r"30 optimizer steps.*e\.g\. trainer\.max_steps=30$"):
        check_resumed_length(SchedulerConfig("one_cycle", interval="step"), 30, 60, 20)
    with pytest.raises(
        ValueError, match=r"run of 3 epochs, but the resumed run lasts 5 epochs.*max_epochs=3$"
    ):
        check_resumed_length(SchedulerConfig("cosine", interval="epoch"), 3, 5, 20)
