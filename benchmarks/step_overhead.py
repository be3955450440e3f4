"""Per-step overhead: a plain PyTorch loop vs a bare LightningModule vs the recipe vs the recipe + callbacks.

Every case trains the same network on the same pre-built batches (a Python list of tensors, so no
data-loading cost differs between them) with the same optimizer (SGD, momentum 0.9) and the same
per-step cosine schedule with restarts:

* ``plain_loop``: forward, cross-entropy, ``zero_grad``, backward, ``step``, schedule step. Nothing else.
* ``bare_module``: a minimal ``LightningModule`` (``training_step`` returns the loss, nothing logged)
  through ``Trainer.fit``: what Lightning itself costs.
* ``recipe``: :class:`~lightning_tricks.recipes.ImageClassifier` through ``Trainer.fit``: its logging,
  running epoch metrics and non-finite-loss guard.
* ``recipe_callbacks``: the recipe with ``EMA``, ``SnapshotEnsemble``, ``SmoothedEarlyStopping``
  (on ``train/loss_epoch``) and ``TrainingDiagnostics``.

The Lightning cases run with a ``CSVLogger`` (in a temporary folder, Lightning's default
``log_every_n_steps=50``), no checkpointing, progress bar or validation, i.e. what a training step
and the epoch boundaries cost. Each case trains ``--epochs`` epochs per round from a fresh model;
the first epoch (allocator warm-up, whitening/init probes) is not timed, the others are, epoch
boundaries included. Cases are interleaved for ``--repeats`` rounds (plain, bare, recipe, callbacks,
plain, ...); the table gives the median and min-max ms per step, the ratios are medians of per-round
ratios. The 1-minute load average before and after is recorded.

Two workloads: the digits ``small_cnn`` at batch 64 (8x8 images, a step of a few ms: the fixed cost
shows) and ``resnet20`` at batch 128 on CIFAR-shaped random tensors (compute-bound).

``--device cuda`` runs every case on the GPU, the batches resident there (no host-to-device copies),
timed between ``torch.cuda.synchronize()`` calls; its workload names end in ``_cuda``
(``small_cnn_b64_cuda/wall/...``), so its JSON never reads as the CPU figures.

Run::

    python benchmarks/step_overhead.py            # both workloads
    python benchmarks/step_overhead.py --quick    # fewer rounds and ResNet-20 steps
    python benchmarks/step_overhead.py --device cuda --out /tmp/step_overhead_cuda.json

Writes ``benchmarks/results/step_overhead.json``. Ratios: ``WORKLOAD/recipe_minus_bare_ms`` (the
recipe's fixed per-step cost over a bare LightningModule, target <= 0.5 on small_cnn),
``WORKLOAD/recipe_vs_plain_loop`` (target <= 1.10 on resnet20), ``WORKLOAD/callbacks_vs_recipe``
(per-epoch cost of the callback stack, target <= 1.05) and ``WORKLOAD/bare_vs_plain_loop`` (Lightning's
own cost).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.nn import functional as F

from lightning_tricks.callbacks import EMA, SmoothedEarlyStopping, SnapshotEnsemble, TrainingDiagnostics
from lightning_tricks.datamodules import DigitsDataModule
from lightning_tricks.recipes import ImageClassifier, OptimizerConfig, SchedulerConfig

try:
    from _report import result_path, write_result
except ModuleNotFoundError:  # imported from outside benchmarks/, which running a script puts on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import result_path, write_result

LR, MOMENTUM, CYCLES = 0.05, 0.9, 2
CLOCKS = ("wall", "cpu")
CPU = torch.device("cpu")


@dataclass(frozen=True)
class Timing:
    """Wall-clock and process CPU time (seconds, or ms per step once divided)."""

    wall: float
    cpu: float

    @staticmethod
    def now() -> Timing:
        return Timing(time.perf_counter(), time.process_time())

    def __sub__(self, other: Timing) -> Timing:
        return Timing(self.wall - other.wall, self.cpu - other.cpu)


Batches = list[tuple[torch.Tensor, torch.Tensor]]


class _Loader:
    """The pre-built batches as one loader (Lightning reads a bare list as a list of loaders)."""

    def __init__(self, batches: Batches) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class Workload:
    name: str
    model: str
    in_channels: int
    batches: Batches
    epochs: int
    device: torch.device = CPU

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches)


def digits_batches(batch: int) -> Batches:
    """The digits training split (8x8, normalised), cut into ``batch``-sized batches once."""
    dm = DigitsDataModule(batch_size=batch, augment=None)
    dm.setup("fit")
    return [(images, labels) for images, labels in dm.train_dataloader()]


def random_batches(batch: int, steps: int) -> Batches:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randn(batch, 3, 32, 32, generator=generator), torch.randint(10, (batch,), generator=generator))
        for _ in range(steps)
    ]


def _scheduler(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=total_steps // CYCLES)


def _network(workload: Workload) -> nn.Module:
    torch.manual_seed(0)
    return ImageClassifier(workload.model, in_channels=workload.in_channels).net.to(workload.device)


def _sync(device: torch.device) -> None:
    """Wait for the device's queued work, so wall time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_plain_loop(workload: Workload) -> Timing:
    """Milliseconds per step over the timed epochs of a hand-written loop."""
    model = _network(workload)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    scheduler = _scheduler(optimizer, workload.epochs * workload.steps_per_epoch)
    model.train()
    start = Timing(0.0, 0.0)
    for epoch in range(workload.epochs):
        if epoch == 1:
            _sync(workload.device)
            start = Timing.now()
        for images, labels in workload.batches:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    _sync(workload.device)
    return _per_step_ms(Timing.now() - start, workload)


class BareModule(L.LightningModule):
    """The least a LightningModule can be: forward, loss, optimizer, schedule."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=LR, momentum=MOMENTUM)
        scheduler = _scheduler(optimizer, int(self.trainer.estimated_stepping_batches))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class _EpochTimer(L.Callback):
    """Wall time from the start of the second epoch to the end of the last."""

    def __init__(self) -> None:
        self.start = Timing(0.0, 0.0)
        self.end = Timing(0.0, 0.0)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.current_epoch == 1:
            _sync(pl_module.device)
            self.start = Timing.now()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self.end = Timing.now()


def _fit(workload: Workload, module: L.LightningModule, callbacks: list[L.Callback]) -> Timing:
    timer = _EpochTimer()
    with tempfile.TemporaryDirectory() as folder:
        trainer = L.Trainer(
            accelerator=workload.device.type,
            devices=1,
            max_epochs=workload.epochs,
            logger=CSVLogger(folder),
            default_root_dir=folder,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            limit_val_batches=0,
            callbacks=[*callbacks, timer],
        )
        trainer.fit(module, train_dataloaders=_Loader(workload.batches))
    return _per_step_ms(timer.end - timer.start, workload)


def time_bare_module(workload: Workload) -> Timing:
    return _fit(workload, BareModule(_network(workload)), [])


def _recipe(workload: Workload) -> ImageClassifier:
    torch.manual_seed(0)
    return ImageClassifier(
        workload.model,
        in_channels=workload.in_channels,
        optimizer=OptimizerConfig(name="sgd", lr=LR, momentum=MOMENTUM, weight_decay=0.0),
        scheduler=SchedulerConfig(name="snapshot", interval="step", warmup=0, kwargs={"cycles": CYCLES}),
    )


def time_recipe(workload: Workload) -> Timing:
    return _fit(workload, _recipe(workload), [])


def time_recipe_callbacks(workload: Workload) -> Timing:
    callbacks = [
        EMA(decay=0.99, validate=False),
        SnapshotEnsemble(cycles=CYCLES),
        SmoothedEarlyStopping(monitor="train/loss_epoch", check_on_train_epoch_end=True, patience=100),
        TrainingDiagnostics(),
    ]
    return _fit(workload, _recipe(workload), callbacks)


def _per_step_ms(seconds: Timing, workload: Workload) -> Timing:
    steps = (workload.epochs - 1) * workload.steps_per_epoch
    return Timing(1000 * seconds.wall / steps, 1000 * seconds.cpu / steps)


CASES: dict[str, Callable[[Workload], Timing]] = {
    "plain_loop": time_plain_loop,
    "bare_module": time_bare_module,
    "recipe": time_recipe,
    "recipe_callbacks": time_recipe_callbacks,
}


def measure(workload: Workload, repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU milliseconds per step of every case, interleaved for ``repeats`` rounds."""
    ms: dict[str, dict[str, list[float]]] = {clock: {case: [] for case in CASES} for clock in CLOCKS}
    for _ in range(repeats):
        for case, run in CASES.items():
            timing = run(workload)
            ms["wall"][case].append(timing.wall)
            ms["cpu"][case].append(timing.cpu)
    return ms


def _median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return round(statistics.median(n / d for n, d in zip(numerators, denominators, strict=True)), 3)


def summarise(
    workload: Workload, clock: str, ms: dict[str, list[float]]
) -> tuple[list[dict], dict[str, float]]:
    """Table rows and ratios of one workload on one clock (``wall`` or ``cpu``)."""
    prefix = f"{workload.name}/{clock}"
    print(
        f"\n{workload.name}, {clock} time: {workload.steps_per_epoch} steps/epoch, "
        f"{workload.epochs - 1} timed epochs"
    )
    print(f"{'case':18} {'ms/step (median)':>17} {'min':>8} {'max':>8} {'vs plain':>9}")
    rows = []
    for case, values in ms.items():
        median = statistics.median(values)
        ratio = _median_ratio(values, ms["plain_loop"])
        print(f"{case:18} {median:17.3f} {min(values):8.3f} {max(values):8.3f} {ratio:9.3f}")
        rows += [
            {"case": f"{prefix}/{case}/ms_per_step", "value": round(median, 4), "unit": "ms"},
            {"case": f"{prefix}/{case}/ms_per_step/min", "value": round(min(values), 4), "unit": "ms"},
            {"case": f"{prefix}/{case}/ms_per_step/max", "value": round(max(values), 4), "unit": "ms"},
        ]
    ours = [r - b for r, b in zip(ms["recipe"], ms["bare_module"], strict=True)]
    lightning = [b - p for b, p in zip(ms["bare_module"], ms["plain_loop"], strict=True)]
    ratios = {
        f"{prefix}/recipe_minus_bare_ms": round(statistics.median(ours), 3),
        f"{prefix}/recipe_minus_bare_ms/min": round(min(ours), 3),
        f"{prefix}/recipe_minus_bare_ms/max": round(max(ours), 3),
        f"{prefix}/bare_minus_plain_loop_ms": round(statistics.median(lightning), 3),
        f"{prefix}/recipe_vs_plain_loop": _median_ratio(ms["recipe"], ms["plain_loop"]),
        f"{prefix}/bare_vs_plain_loop": _median_ratio(ms["bare_module"], ms["plain_loop"]),
        f"{prefix}/recipe_vs_bare": _median_ratio(ms["recipe"], ms["bare_module"]),
        f"{prefix}/callbacks_vs_recipe": _median_ratio(ms["recipe_callbacks"], ms["recipe"]),
    }
    print(
        f"recipe - bare = {ratios[f'{prefix}/recipe_minus_bare_ms']:.3f} ms/step "
        f"(rounds {min(ours):.3f} to {max(ours):.3f}); "
        f"Lightning (bare - plain) = {statistics.median(lightning):.3f} ms/step; "
        f"callbacks/recipe = {ratios[f'{prefix}/callbacks_vs_recipe']:.3f}"
    )
    return rows, ratios


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds, 4 ResNet-20 steps per epoch")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 7, quick 3)")
    parser.add_argument(
        "--workloads", nargs="+", default=["small_cnn", "resnet20"], choices=["small_cnn", "resnet20"]
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every case runs")
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per round, the first untimed (default 6 / ResNet-20 3)",
    )
    parser.add_argument("--out", default=str(result_path("step_overhead")))
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine; use --device cpu")
    if args.epochs is not None and args.epochs < 2:
        parser.error(f"--epochs must be >= 2 (the first epoch is not timed), got {args.epochs}")
    torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    device = torch.device(args.device)
    suffix = "" if device.type == "cpu" else f"_{device.type}"

    def on_device(batches: Batches) -> Batches:
        return [(images.to(device), labels.to(device)) for images, labels in batches]

    workloads = {
        "small_cnn": lambda: Workload(
            f"small_cnn_b64{suffix}", "small_cnn", 1, on_device(digits_batches(64)), args.epochs or 6, device
        ),
        "resnet20": lambda: Workload(
            f"resnet20_b128{suffix}",
            "resnet20",
            3,
            on_device(random_batches(128, 4 if args.quick else 8)),
            args.epochs or 3,
            device,
        ),
    }
    warnings.filterwarnings("ignore")  # Lightning's advice on tiny runs (few batches, no workers)
    load_before = os.getloadavg()[0]
    rows: list[dict] = []
    ratios: dict[str, float] = {}
    for name in args.workloads:
        workload = workloads[name]()
        ms = measure(workload, repeats)
        for clock in CLOCKS:
            clock_rows, clock_ratios = summarise(workload, clock, ms[clock])
            rows += clock_rows
            ratios.update(clock_ratios)
    load_after = os.getloadavg()[0]
    print(
        f"\n{repeats} interleaved rounds on {device.type}, {args.threads} torch thread(s), "
        f"load average (1 min) {load_before:.1f} -> {load_after:.1f}"
    )
    rows.append({"case": "load_average_1min/before", "value": round(load_before, 2), "unit": "load"})
    rows.append({"case": "load_average_1min/after", "value": round(load_after, 2), "unit": "load"})
    targets = {
        f"{workload}{suffix}/{clock}/{key}": value
        for workload, key, value in (
            ("small_cnn_b64", "recipe_minus_bare_ms", 0.5),
            ("resnet20_b128", "recipe_vs_plain_loop", 1.10),
            ("small_cnn_b64", "callbacks_vs_recipe", 1.05),
            ("resnet20_b128", "callbacks_vs_recipe", 1.05),
        )
        for clock in CLOCKS
    }
    out = write_result("step_overhead", rows, ratios, targets, out=args.out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
