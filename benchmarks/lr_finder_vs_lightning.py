"""Suggested learning rates and the accuracy they reach: lightning-tricks ``LRFinder`` vs ``Tuner.lr_find``.

For each seed, both finders sweep the same range (``1e-5`` to ``10``, 100 steps) on the digits recipe
(``ImageClassifier(small_cnn)`` + ``DigitsDataModule``, SGD with momentum 0.9, constant lr). Then a
fresh model is trained for a fixed short budget with each suggestion: ours (``valley`` applied by
default, plus ``steepest`` and ``min_div_10`` reported) and Lightning's single ``steepest`` rule.
Reported: suggested lr, test accuracy (mean and min over seeds) and the finder's wall time.

Run::

    python benchmarks/lr_finder_vs_lightning.py           # 3 seeds
    python benchmarks/lr_finder_vs_lightning.py --quick   # 1 seed

Writes ``benchmarks/results/lr_finder_vs_lightning.json``. Ratio ``ours_valley_vs_lightning_acc`` is
our mean test accuracy divided by Lightning's (higher is better, target 1.0); ``*_min_acc`` the same
for the worst seed, which shows how often a suggestion misfires.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.tuner import Tuner

from lightning_tricks.callbacks.lr_finder import LRFinder
from lightning_tricks.datamodules.digits import DigitsDataModule
from lightning_tricks.recipes.classifier import ImageClassifier
from lightning_tricks.recipes.optim import OptimizerConfig

try:
    from _report import result_path, write_result
except ModuleNotFoundError:  # imported from outside benchmarks/, which running a script puts on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import result_path, write_result

MIN_LR, MAX_LR, NUM_STEPS = 1e-5, 10.0, 100
EPOCHS = 3


def make_model(lr: float) -> ImageClassifier:
    return ImageClassifier(
        model="small_cnn",
        num_classes=10,
        in_channels=1,
        optimizer=OptimizerConfig(name="sgd", lr=lr, momentum=0.9),
    )


def trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        default_root_dir=str(root),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        deterministic=True,
    )
    return L.Trainer(**{**defaults, **kwargs})


def find_ours(seed: int, root: Path) -> tuple[dict[str, float], float]:
    L.seed_everything(seed, verbose=False)
    finder = LRFinder(min_lr=MIN_LR, max_lr=MAX_LR, num_steps=NUM_STEPS, apply=False, plot=False)
    start = time.perf_counter()
    trainer(root, max_steps=1, limit_val_batches=0, callbacks=[finder]).fit(
        make_model(0.1), datamodule=DigitsDataModule(seed=seed)
    )
    return finder.results.suggestions, time.perf_counter() - start


def find_lightning(seed: int, root: Path) -> tuple[float | None, float]:
    L.seed_everything(seed, verbose=False)
    start = time.perf_counter()
    result = Tuner(trainer(root)).lr_find(
        make_model(0.1),
        datamodule=DigitsDataModule(seed=seed),
        min_lr=MIN_LR,
        max_lr=MAX_LR,
        num_training=NUM_STEPS,
        update_attr=False,
    )
    return result.suggestion(), time.perf_counter() - start


def test_accuracy(lr: float | None, seed: int, root: Path) -> float:
    if lr is None or not math.isfinite(lr):
        return 0.0
    L.seed_everything(seed, verbose=False)
    dm = DigitsDataModule(seed=seed)
    t = trainer(root, max_epochs=EPOCHS, limit_val_batches=0)
    model = make_model(lr)
    t.fit(model, datamodule=dm)
    return float(t.test(model, datamodule=dm, verbose=False)[0]["test/acc"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one seed instead of three")
    parser.add_argument("--out", default=str(result_path("lr_finder_vs_lightning")))
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    seeds = [0] if args.quick else [0, 1, 2]
    root = Path("/tmp/lr_finder_vs_lightning")
    lrs: dict[str, list[float | None]] = {}
    accs: dict[str, list[float]] = {}
    times: dict[str, list[float]] = {"ours": [], "lightning": []}
    for seed in seeds:
        ours, t_ours = find_ours(seed, root)
        theirs, t_theirs = find_lightning(seed, root)
        times["ours"].append(t_ours)
        times["lightning"].append(t_theirs)
        candidates = {f"ours_{k}": v for k, v in ours.items()} | {"lightning_steepest": theirs}
        for case, lr in candidates.items():
            lrs.setdefault(case, []).append(lr)
            accs.setdefault(case, []).append(test_accuracy(lr, seed, root))
            shown = "none" if lr is None else f"{lr:.3g}"
            print(f"seed {seed}  {case:<20} lr={shown:>9}  test/acc={accs[case][-1]:.4f}")

    rows = []
    print(f"\n{'case':<22}{'lr (geo mean)':>14}{'acc mean':>10}{'acc min':>9}")
    for case in accs:
        valid = [v for v in lrs[case] if v]
        geo = math.exp(statistics.fmean(math.log(v) for v in valid)) if valid else float("nan")
        mean, low = statistics.fmean(accs[case]), min(accs[case])
        print(f"{case:<22}{geo:>14.3g}{mean:>10.4f}{low:>9.4f}")
        rows += [
            {"case": f"{case}/lr", "value": geo, "unit": "lr"},
            {"case": f"{case}/test_acc_mean", "value": mean, "unit": "acc"},
            {"case": f"{case}/test_acc_min", "value": low, "unit": "acc"},
        ]
    for who, ts in times.items():
        rows.append({"case": f"{who}/finder_time", "value": statistics.median(ts), "unit": "s"})
        print(f"{who} finder wall time (median): {statistics.median(ts):.2f} s")

    ref_mean, ref_min = statistics.fmean(accs["lightning_steepest"]), min(accs["lightning_steepest"])
    ratios = {
        "ours_valley_vs_lightning_acc": statistics.fmean(accs["ours_valley"]) / ref_mean,
        "ours_valley_vs_lightning_min_acc": min(accs["ours_valley"]) / max(ref_min, 1e-9),
        "ours_vs_lightning_finder_time": statistics.median(times["ours"])
        / statistics.median(times["lightning"]),
    }
    targets = {"ours_valley_vs_lightning_acc": 1.0, "ours_valley_vs_lightning_min_acc": 1.0}
    out = write_result("lr_finder_vs_lightning", rows, ratios, targets, out=args.out)
    print({k: round(v, 3) for k, v in ratios.items()}, f"wrote {out}")


if __name__ == "__main__":
    main()
