"""Time of one EMA update: lightning-tricks ``EMA`` vs timm, torch-ema and torch ``AveragedModel``.

Every implementation averages the same torchvision ResNet parameter set (timm, AveragedModel and
ours also average the BatchNorm buffers; torch-ema averages parameters only, as it always does).
For each case: warm-up updates, then the median (and range) over repeats of the mean time of a block
of updates (synchronised on CUDA), the implementations sampled round-robin; the ratio to the fastest
peer is taken per round, so its range shows what load does to it. ``ours`` is the
callback's own update path (``EMA._update``).

Run::

    python benchmarks/ema_overhead.py            # CPU, and CUDA when available
    python benchmarks/ema_overhead.py --quick    # short run

Writes ``benchmarks/results/ema_overhead.json``; ratio ``ours_vs_fastest_peer`` is ours divided
by the fastest peer (lower is better, target 1.0), the worst case over the model/device cases.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from lightning_tricks.callbacks.ema import EMA

try:
    from _report import result_path, write_result
except ModuleNotFoundError:  # imported from outside benchmarks/, which running a script puts on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _report import result_path, write_result

DECAY = 0.999


def make_ours(model: nn.Module) -> Callable[[], None]:
    ema = EMA(decay=DECAY)
    ema._average_model = AveragedModel(model, use_buffers=True)
    ema._ema = ema._build_ema(model)
    return lambda: ema._update(model)


def make_timm(model: nn.Module) -> Callable[[], None]:
    from timm.utils.model_ema import ModelEmaV3

    ema = ModelEmaV3(model, decay=DECAY)
    return lambda: ema.update(model)


def make_torch_ema(model: nn.Module) -> Callable[[], None]:
    from torch_ema import ExponentialMovingAverage

    ema = ExponentialMovingAverage(model.parameters(), decay=DECAY)
    return ema.update


def make_averaged_model(model: nn.Module) -> Callable[[], None]:
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(DECAY), use_buffers=True)
    return lambda: ema.update_parameters(model)


IMPLEMENTATIONS: dict[str, Callable[[nn.Module], Callable[[], None]]] = {
    "ours": make_ours,
    "timm_ModelEmaV3": make_timm,
    "torch_ema": make_torch_ema,
    "AveragedModel": make_averaged_model,
}


def time_updates(
    updates: dict[str, Callable[[], None]], device: torch.device, warmup: int, repeats: int, block: int
) -> dict[str, list[float]]:
    """Per implementation, ``repeats`` samples of the mean milliseconds per update in a block of
    ``block`` updates.

    The implementations are sampled round-robin, one block each per repeat, so load from other
    processes falls on all of them alike; sample ``i`` of every implementation is from round ``i``.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    samples: dict[str, list[float]] = {name: [] for name in updates}
    with torch.no_grad():
        for update in updates.values():
            for _ in range(warmup):
                update()
        sync()
        for _ in range(repeats):
            for name, update in updates.items():
                start = time.perf_counter()
                for _ in range(block):
                    update()
                sync()
                samples[name].append((time.perf_counter() - start) * 1000 / block)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and only ResNet-18 on CPU")
    parser.add_argument("--out", default=str(result_path("ema_overhead")))
    args = parser.parse_args()

    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    models = ["resnet18"] if args.quick else ["resnet18", "resnet50"]
    rows, ratios = [], {}
    print(f"{'device':6} {'model':9} {'implementation':16} {'ms/update':>10}")
    for device in devices:
        on_cuda = device.type == "cuda"
        warmup, repeats = (3, 7) if args.quick else (10, 41)
        block = 20 if on_cuda else (2 if args.quick else 3)
        for model_name in models:
            torch.manual_seed(0)
            model = getattr(torchvision.models, model_name)(weights=None).to(device)
            updates = {name: make(model) for name, make in IMPLEMENTATIONS.items()}
            samples = time_updates(updates, device, warmup, repeats, block)
            prefix = f"{device.type}/" if on_cuda else ""
            for name, values in samples.items():
                case = f"{prefix}{model_name}/{name}"
                value = statistics.median(values)
                rows.append({"case": case, "value": round(value, 4), "unit": "ms"})
                rows.append({"case": f"{case}/min", "value": round(min(values), 4), "unit": "ms"})
                rows.append({"case": f"{case}/max", "value": round(max(values), 4), "unit": "ms"})
                spread = f"({min(values):.3f}-{max(values):.3f})"
                print(f"{device.type:6} {model_name:9} {name:16} {value:10.3f}  {spread}")
            # Ours over the fastest peer of the same round: the rounds' spread is the spread under load.
            peers = [values for name, values in samples.items() if name != "ours"]
            per_round = [samples["ours"][i] / min(peer[i] for peer in peers) for i in range(repeats)]
            key = f"{device.type}/{model_name}/ours_vs_fastest_peer"
            ratios[key] = round(statistics.median(per_round), 3)
            ratios[f"{key}/min"], ratios[f"{key}/max"] = round(min(per_round), 3), round(max(per_round), 3)
            print(
                f"{'':6} {model_name:9} {'ours/fastest peer':16} {ratios[key]:10.3f}"
                f"  ({min(per_round):.3f}-{max(per_round):.3f}, per round)"
            )
            del updates, model
    ratios["ours_vs_fastest_peer"] = max(v for k, v in ratios.items() if k.endswith("ours_vs_fastest_peer"))
    out = write_result("ema_overhead", rows, ratios, {"ours_vs_fastest_peer": 1.0}, out=args.out)
    print(f"ours_vs_fastest_peer (worst case) = {ratios['ours_vs_fastest_peer']:.3f}; wrote {out}")


if __name__ == "__main__":
    main()
