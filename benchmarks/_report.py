"""Machine description and JSON result files shared by the benchmark scripts.

Every ``benchmarks/NAME.py`` writes ``benchmarks/results/NAME.json`` in one shape, read by tools
outside the project::

    {"benchmark": NAME, "machine": ..., "torch": ..., "rows": [{"case", "value", "unit"}],
     "ratios": {...}, "targets": {...}}
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from lightning_tricks._io import atomic_write_bytes

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def result_path(name: str) -> Path:
    """Default output file of benchmark ``name``: ``benchmarks/results/NAME.json``."""
    return RESULTS_DIR / f"{name}.json"


def machine_description() -> str:
    """CPU model, usable cores and torch threads, plus the GPU name when CUDA is available."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"cpu: {len(os.sched_getaffinity(0))} cores {cpu}, torch threads {torch.get_num_threads()}"
    if torch.cuda.is_available():
        text += f" | gpu: {torch.cuda.get_device_name()}"
    load = os.getloadavg()
    return text + f" | load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} (1/5/15 min, when written)"


def write_result(
    name: str,
    rows: Sequence[Mapping[str, object]],
    ratios: Mapping[str, float],
    targets: Mapping[str, float],
    out: str | Path | None = None,
) -> Path:
    """Write one benchmark's results as JSON and return the file written.

    Args:
        name: benchmark name, stored under ``"benchmark"``.
        rows: one ``{"case", "value", "unit"}`` mapping per measurement.
        ratios: side-by-side ratios measured in this run; each key names its numerator.
        targets: the value each ratio should reach.
        out: output file; defaults to :func:`result_path` of ``name``.
    """
    path = Path(out) if out is not None else result_path(name)
    payload = {
        "benchmark": name,
        "machine": machine_description(),
        "torch": torch.__version__,
        "rows": [dict(row) for row in rows],
        "ratios": dict(ratios),
        "targets": dict(targets),
    }
    atomic_write_bytes((json.dumps(payload, indent=2) + "\n").encode(), path)
    return path
