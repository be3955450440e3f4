"""CIFAR speed: per-epoch time and images/s of the airbench network, plain loop vs our recipe vs airbench.

All cases train on the same CIFAR-shaped synthetic tensors (one
:class:`~lightning_tricks.datamodules.SyntheticDataModule`, seed 0: uint8 images, batched
on-device flip + translate, normalisation) with the same network (``airbench``), optimizer
(Nesterov SGD, norm biases at 64x lr), label smoothing 0.2 and triangular one-cycle schedule:

* ``plain_loop``: a hand-written PyTorch loop over ``train_dataloader()`` +
  ``on_after_batch_transfer``: forward, loss, backward, step, schedule step. Nothing else.
* ``recipe``: :class:`~lightning_tricks.recipes.ImageClassifier` through ``lightning.Trainer.fit``
  (no logger, checkpointing or progress bar: what ``configs/cifar10_speedrun.yaml`` trains with,
  minus I/O).
* ``airbench``: the ``airbench`` package's own training loop (``airbench.train94``, airbench 0.1.8) on
  the same synthetic tensors, written to a temporary folder in its ``CifarLoader`` format. It needs CUDA
  and the package: elsewhere the row says ``skipped: needs CUDA`` or ``skipped: airbench not
  installed``, in the table and the JSON (``value: null``, the reason as ``unit``). Importing airbench
  sets ``torch.backends.cudnn.benchmark = True`` for the whole process, so on such a run all cases
  train with cuDNN autotuning.

On CUDA both our cases run with the speedrun config's GPU settings: ``--precision bf16-mixed``
(default there; the plain loop under ``torch.autocast`` in bf16), ``channels_last`` weights and
inputs, the data resident on the device, and ``--compile MODE`` when given (off by default: each
round builds a fresh network, and compiling it costs about a minute). airbench trains in fp16.
* ``flop_bound``: the FLOPs of one training step (forward + backward, counted with
  ``torch.utils.flop_counter.FlopCounterMode``) per image; on CUDA divided by the device's dense
  bf16 peak (``--peak-tflops`` or a small table of known GPUs) as the epoch-time lower bound and
  the achieved fraction of peak. A CPU has no reliable peak figure, so only the achieved FLOP/s are
  given there.

Each case trains two epochs per round from a fresh model; the second epoch is timed (the first
holds the whitening init, allocator warm-up and any compilation). Cases are interleaved for
``--repeats`` rounds; the table gives the median and min-max range. The 1-minute load average
before and after is recorded.

Run::

    python benchmarks/cifar_speed.py --quick     # small widths and epoch, for a CPU
    python benchmarks/cifar_speed.py             # full airbench widths, 8192-image epochs

Writes ``benchmarks/results/cifar_speed.json``; ``recipe_vs_plain_loop`` is the median per-round
ratio of epoch times (lower is better; target <= 1.10), ``recipe_vs_airbench`` (CUDA, target <= 1.3)
and ``recipe_peak_fraction`` (CUDA, target >= 0.40).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from lightning_tricks.datamodules import SyntheticDataModule
from lightning_tricks.recipes import ImageClassifier, OptimizerConfig, SchedulerConfig
from lightning_tricks.recipes.classifier import COMPILE_MODES
from lightning_tricks.recipes.optim import build_optimizer
from lightning_tricks.recipes.regularization import RegularizationConfig
from lightning_tricks.recipes.schedules import build_scheduler

try:
    from _report import result_path, write_result
except ModuleNotFoundError:  # imported from outside benchmarks/, which running a script puts on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import result_path, write_result

EPOCHS = 2  # per round; the last one is timed
LABEL_SMOOTHING = 0.2
OPTIMIZER = OptimizerConfig(
    name="sgd", lr=1.5, momentum=0.85, nesterov=True, weight_decay=1.3e-3, lr_multipliers={"norm_bias": 64}
)
SCHEDULER = SchedulerConfig(
    name="one_cycle",
    interval="step",
    warmup=0,
    kwargs={
        "pct_start": 0.23,
        "anneal_strategy": "linear",
        "div_factor": 5.0,
        "final_div_factor": 2.857,
        "cycle_momentum": False,
    },
)
#: Dense bf16 tensor-core peak in TFLOP/s by device-name fragment (vendor data sheets, SXM parts).
BF16_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "4090": 165.0}


def make_datamodule(num_train: int, batch: int, accelerator: str) -> SyntheticDataModule:
    return SyntheticDataModule(
        num_train=num_train,
        num_val=0,
        num_test=0,
        batch_size=batch,
        augment="crop_flip",
        flip_mode="alternating",  # as airbench's loader (altflip=True) below
        data_on_device=accelerator == "cuda",
    )


def time_plain_loop(args: argparse.Namespace, device: torch.device, accelerator: str) -> float:
    """Seconds of the last of ``EPOCHS`` epochs of a hand-written loop."""
    dm = make_datamodule(args.num_train, args.batch, accelerator)
    trainer = L.Trainer(accelerator=accelerator, devices=1, logger=False, enable_progress_bar=False)
    trainer.training = True  # so the DataModule augments, as in fit
    dm.trainer = trainer
    dm.setup("fit")
    torch.manual_seed(0)
    channels_last = accelerator == "cuda"
    model = ImageClassifier("airbench", model_kwargs={"widths": args.widths}).net.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        model.compile(mode=args.compile)
    bf16 = args.precision == "bf16-mixed"
    optimizer = build_optimizer(model, OPTIMIZER)
    steps = EPOCHS * len(dm.train_dataloader())
    scheduler = build_scheduler(optimizer, SCHEDULER, total_steps=steps, steps_per_epoch=steps // EPOCHS)[
        "scheduler"
    ]
    model.train()
    elapsed = 0.0
    for epoch in range(EPOCHS):
        _sync(device)
        start = time.perf_counter()
        for images, labels in dm.train_dataloader():
            images, labels = dm.on_after_batch_transfer((images.to(device), labels.to(device)), 0)
            if epoch == 0 and not bool(model.whitening_initialized):
                model.init_whitening(images)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(images), labels, label_smoothing=LABEL_SMOOTHING)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        _sync(device)
        elapsed = time.perf_counter() - start
    return elapsed


class _EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        _sync(pl_module.device)
        self.times.append(time.perf_counter() - self._start)


def time_recipe(args: argparse.Namespace, device: torch.device, accelerator: str) -> float:
    """Seconds of the last of ``EPOCHS`` epochs of ``ImageClassifier`` through ``Trainer.fit``."""
    dm = make_datamodule(args.num_train, args.batch, accelerator)
    torch.manual_seed(0)
    model = ImageClassifier(
        "airbench",
        model_kwargs={"widths": args.widths},
        optimizer=OPTIMIZER,
        scheduler=SCHEDULER,
        regularization=RegularizationConfig(label_smoothing=LABEL_SMOOTHING),
        channels_last=accelerator == "cuda",
        compile=args.compile,
    )
    timer = _EpochTimer()
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=1,
        precision=args.precision,
        max_epochs=EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=[timer],
    )
    trainer.fit(model, dm)
    return timer.times[-1]


def airbench_unavailable_reason(cuda: bool) -> str | None:
    """Why the ``airbench`` package's own loop is not timed here (``"skipped: ..."``), or ``None``."""
    if not cuda:
        return "skipped: needs CUDA"
    try:
        import airbench  # noqa: F401
    except ImportError:
        return "skipped: airbench not installed (pip install airbench)"
    return None


_airbench_warm = False


def time_airbench(args: argparse.Namespace) -> float:
    """Seconds per epoch of ``airbench.train94`` on the same synthetic tensors (CUDA only).

    airbench's ``CifarLoader(path, train, batch_size, aug, altflip)`` reads ``FOLDER/train.pt``
    (``{"images": uint8 NHWC, "labels": int64, "classes": [str]}``, loaded onto the GPU) and downloads
    CIFAR-10 only when that file is missing, so the synthetic split is written there in its format;
    ``train94`` also builds a test loader from ``./cifar10/test.pt`` (a copy; with ``verbose=False`` it
    never evaluates). Each ``train94`` call builds a fresh fp16 network, initialises its whitening layer
    and preprocesses the whole split before its first epoch, so the epoch time is the difference between
    a ``1 + EPOCHS``-epoch and a 1-epoch call, divided by ``EPOCHS``: the steady-state epochs alone, as
    for the other cases. The first call of a process (cuDNN autotuning, allocator) is not timed.
    """
    global _airbench_warm
    import airbench

    widths = dict(zip(("block1", "block2", "block3"), args.widths, strict=True))  # ours, also with --quick

    def timed_train94(loader: object, epochs: int) -> float:
        torch.cuda.synchronize()
        start = time.perf_counter()
        airbench.train94(
            loader, epochs=epochs, make_net=lambda: airbench.make_net94(widths=widths), verbose=False
        )
        torch.cuda.synchronize()
        return time.perf_counter() - start

    dm = make_datamodule(args.num_train, args.batch, "cuda")
    images, labels = dm.load_splits()["train"]
    payload = {
        "images": images.permute(0, 2, 3, 1).contiguous(),
        "labels": labels,
        "classes": list("0123456789"),
    }
    with tempfile.TemporaryDirectory() as root:
        folder = Path(root) / "cifar10"
        folder.mkdir()
        for name in ("train.pt", "test.pt"):
            torch.save(payload, folder / name)
        previous = os.getcwd()
        os.chdir(root)  # train94 builds its test loader from the relative folder "cifar10"
        try:
            loader = airbench.CifarLoader(
                str(folder),
                train=True,
                batch_size=args.batch,
                aug={"flip": True, "translate": 2},
                altflip=True,
            )
            if not _airbench_warm:
                timed_train94(loader, 1)
                _airbench_warm = True
            one = timed_train94(loader, 1)
            return (timed_train94(loader, 1 + EPOCHS) - one) / EPOCHS
        finally:
            os.chdir(previous)


def train_step_flops(widths: tuple[int, ...], batch: int, device: torch.device) -> float:
    """FLOPs of one forward + backward pass of the network on a batch of ``batch`` 32x32 images."""
    torch.manual_seed(0)
    model = ImageClassifier("airbench", model_kwargs={"widths": widths}).net.to(device)
    images = torch.randn(batch, 3, 32, 32, device=device)
    labels = torch.randint(10, (batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    return float(counter.get_total_flops())


def peak_flops(device: torch.device, override_tflops: float | None) -> float | None:
    if device.type != "cuda":
        return None
    if override_tflops is not None:
        return override_tflops * 1e12
    name = torch.cuda.get_device_name(device)
    return next((tf * 1e12 for key, tf in BF16_PEAK_TFLOPS.items() if key in name), None)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="narrow network, 512-image epochs, 3 rounds")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5, quick 3)")
    parser.add_argument("--num-train", type=int, default=None, help="images per epoch")
    parser.add_argument("--batch", type=int, default=None, help="batch size (default 1024, quick 128)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak FLOP/s override (CUDA)")
    parser.add_argument(
        "--precision",
        choices=["32-true", "bf16-mixed"],
        default=None,
        help="Lightning precision of our cases (default bf16-mixed on CUDA, 32-true on a CPU)",
    )
    parser.add_argument(
        "--compile", default=None, choices=list(COMPILE_MODES), help="torch.compile mode of our cases (off)"
    )
    parser.add_argument("--out", default=str(result_path("cifar_speed")))
    args = parser.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.batch = args.batch or (128 if args.quick else 1024)
    args.num_train = args.num_train or (512 if args.quick else 8192)
    args.widths = (16, 64, 64) if args.quick else (64, 256, 256)

    cuda = torch.cuda.is_available()
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    accelerator = "cuda" if cuda else "cpu"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    cases = {"plain_loop": time_plain_loop, "recipe": time_recipe}
    reason = airbench_unavailable_reason(cuda)
    if reason is None:
        cases["airbench"] = lambda args, device, accelerator: time_airbench(args)
    load_before = os.getloadavg()[0]
    seconds: dict[str, list[float]] = {case: [] for case in cases}
    for _ in range(args.repeats):
        for case, run in cases.items():
            seconds[case].append(run(args, device, accelerator))
    load_after = os.getloadavg()[0]

    flops_per_image = train_step_flops(args.widths, min(args.batch, 64), device) / min(args.batch, 64)
    peak = peak_flops(device, args.peak_tflops)
    steps = args.num_train // args.batch + bool(args.num_train % args.batch)
    images = args.num_train
    print(
        f"{args.num_train} images/epoch, batch {args.batch}, widths {list(args.widths)}, {accelerator}, "
        f"{args.precision}, compile {args.compile or 'off'}, "
        f"{args.repeats} interleaved rounds, load {load_before:.1f} -> {load_after:.1f}"
    )
    header = f"{'case':12} {'epoch s (median)':>17} {'min':>8} {'max':>8} {'images/s':>10} {'TFLOP/s':>9}"
    print(header)
    rows = []
    for case, values in seconds.items():
        median = statistics.median(values)
        achieved = flops_per_image * images / median / 1e12
        print(
            f"{case:12} {median:17.3f} {min(values):8.3f} {max(values):8.3f} {images / median:10,.0f} "
            f"{achieved:9.3f}"
        )
        rows += [
            {"case": f"{case}/epoch_seconds", "value": round(median, 4), "unit": "s"},
            {"case": f"{case}/epoch_seconds/min", "value": round(min(values), 4), "unit": "s"},
            {"case": f"{case}/epoch_seconds/max", "value": round(max(values), 4), "unit": "s"},
            {"case": f"{case}/images_per_second", "value": round(images / median, 1), "unit": "images/s"},
        ]
    if reason is not None:
        print(f"{'airbench':12} {reason:>17}")
        rows.append({"case": "airbench/epoch_seconds", "value": None, "unit": reason})
    bound = flops_per_image * images / peak if peak else None
    bound_text = f"{bound:.4f} s" if bound else "skipped: needs CUDA and a known peak"
    print(f"{'flop_bound':12} {bound_text:>17}   {flops_per_image / 1e9:.3f} GFLOP per image per step")
    rows.append(
        {"case": "flop_bound/gflop_per_image", "value": round(flops_per_image / 1e9, 4), "unit": "GFLOP"}
    )
    rows.append(
        {
            "case": "flop_bound/epoch_seconds",
            "value": bound,
            "unit": "s" if bound else "skipped: needs CUDA and a known peak",
        }
    )
    rows.append({"case": "steps_per_epoch", "value": steps, "unit": "steps"})
    rows.append({"case": "settings/bf16_mixed", "value": int(args.precision == "bf16-mixed"), "unit": "bool"})
    rows.append(
        {"case": "settings/compile", "value": int(args.compile is not None), "unit": args.compile or "off"}
    )
    rows.append({"case": "load_average_1min/before", "value": round(load_before, 2), "unit": "load"})
    rows.append({"case": "load_average_1min/after", "value": round(load_after, 2), "unit": "load"})

    per_round = [r / p for p, r in zip(seconds["plain_loop"], seconds["recipe"], strict=True)]
    ratios = {
        "recipe_vs_plain_loop": round(statistics.median(per_round), 3),
        "recipe_vs_plain_loop/min": round(min(per_round), 3),
        "recipe_vs_plain_loop/max": round(max(per_round), 3),
    }
    if "airbench" in seconds:
        per_round_airbench = [r / a for a, r in zip(seconds["airbench"], seconds["recipe"], strict=True)]
        ratios["recipe_vs_airbench"] = round(statistics.median(per_round_airbench), 3)
    if bound:
        ratios["recipe_peak_fraction"] = round(bound / statistics.median(seconds["recipe"]), 3)
    targets = {"recipe_vs_plain_loop": 1.10, "recipe_vs_airbench": 1.3, "recipe_peak_fraction": 0.40}
    out = write_result("cifar_speed", rows, ratios, targets, out=args.out)
    low, high = ratios["recipe_vs_plain_loop/min"], ratios["recipe_vs_plain_loop/max"]
    median_ratio = ratios["recipe_vs_plain_loop"]
    print(f"recipe_vs_plain_loop = {median_ratio:.2f}x (rounds {low:.2f}-{high:.2f}x); wrote {out}")


if __name__ == "__main__":
    main()
