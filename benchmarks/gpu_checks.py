"""One command that finishes the speed work on a CUDA machine: tests, benchmarks, one summary table.

Runs, each as its own process with its own time budget (``timeout``; a failing or timed-out step is
reported and the next one runs):

1. ``cuda_tests``: ``pytest -m cuda`` on ``tests/cuda``'s sync and data tests (no device sync on the
   speedrun recipe's quiet steps, no host-to-device copies with ``data_on_device``), then
   ``cuda_switch_tests`` on its switch tests (channels_last / compile / bf16 one-step losses; compiling
   takes the longest, so it runs in a process of its own and cannot cost the other results).
2. ``cifar_speed``: ``benchmarks/cifar_speed.py`` at full size (8,192-image epochs, airbench widths, bf16):
   the recipe's epoch against a plain loop and, when the ``airbench`` package imports, airbench's
   own loop; the fraction of the GPU's bf16 peak.
3. ``data_throughput``: ``benchmarks/data_throughput.py`` with its ``device_resident`` row.
4. ``step_overhead``: ``benchmarks/step_overhead.py --device cuda``.

Every result (JSON in the benchmarks' shape, the tests' JUnit XML, one log per step) is written to
the output folder, plus ``gpu_checks.json`` with the summary; the table at the end compares each
measured value with its target. The budgets add up to 7 min 30 s (``--budget-scale`` scales them).

Run::

    python benchmarks/gpu_checks.py OUT_DIR                    # on the GPU machine
    python benchmarks/gpu_checks.py OUT_DIR --only cifar_speed  # rerun one step
    python benchmarks/gpu_checks.py OUT_DIR --cpu-dry-run      # same pipeline, tiny sizes, on a CPU

On a machine without network and without pytest, rich, jsonargparse or airbench, carry the wheels
that ``benchmarks/gpu_wheels.sh`` fetches (its header and the README give the one-line install).

``--cpu-dry-run`` checks the plumbing (commands, output files, summary) on a machine without a GPU:
the CUDA tests are collected and skipped, the benchmarks run on the CPU with tiny sizes, and the
CUDA-only rows of the table say ``not measured``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

try:
    from _report import write_result
except ModuleNotFoundError:
    # Imported from outside benchmarks/ (which running a script puts on sys.path), or run from a plain
    # checkout where lightning_tricks is not installed: the checkout's src/, as the steps get it.
    sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1] / "src")]
    from _report import write_result

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
KILL_GRACE_S = 10


@dataclass(frozen=True)
class Step:
    """One process of the pipeline: its command (given the output folder) and time budget."""

    name: str
    command: Callable[[Path], list[str]]
    budget_s: int
    dry_command: Callable[[Path], list[str]] | None = None  # tiny CPU variant for --cpu-dry-run


def _benchmark(script: str, *args: str) -> Callable[[Path], list[str]]:
    """``python benchmarks/SCRIPT ARGS --out OUT/SCRIPT.json``: the JSON ``summarise`` reads by name."""
    return lambda out: [
        sys.executable,
        str(BENCHMARKS / script),
        *args,
        *("--out", str(out / f"{Path(script).stem}.json")),
    ]


def _pytest(name: str, *files: str) -> Callable[[Path], list[str]]:
    """``pytest -m cuda`` on ``tests/cuda/test_cuda_FILE.py`` for each file, JUnit XML in ``NAME.xml``.

    addopts cleared: the project's ``--timeout`` needs pytest-timeout, which a bare machine may lack;
    this script's own budget bounds the run instead.
    """
    return lambda out: [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-o",
        "addopts=",
        "--strict-markers",
        "-rA",
        "-m",
        "cuda",
        f"--junitxml={out / f'{name}.xml'}",
        *(str(REPO / "tests" / "cuda" / f"test_cuda_{file}.py") for file in files),
    ]


STEPS = (
    Step("cuda_tests", _pytest("cuda_tests", "step_sync", "data_on_device"), 60),
    Step("cuda_switch_tests", _pytest("cuda_switch_tests", "speed_switches"), 100),
    Step(
        "cifar_speed",
        _benchmark("cifar_speed.py"),
        140,
        _benchmark("cifar_speed.py", "--quick", "--num-train", "64", "--batch", "32", "--repeats", "1"),
    ),
    Step(
        "data_throughput",
        _benchmark("data_throughput.py"),
        50,
        _benchmark("data_throughput.py", "--num-train", "256", "--repeats", "1", "--workers", "0"),
    ),
    Step(
        "step_overhead",
        _benchmark("step_overhead.py", "--device", "cuda", "--repeats", "5"),
        100,
        _benchmark(
            "step_overhead.py",
            *("--device", "cpu", "--workloads", "small_cnn", "--repeats", "1", "--epochs", "2"),
        ),
    ),
)


@dataclass
class Outcome:
    name: str
    status: str  # "ok", "failed (exit N)", "timed out after N s", "not run: ..."
    seconds: float


def run_step(step: Step, out: Path, dry_run: bool, scale: float) -> Outcome:
    """Run one step in its own process group, its output in ``out/logs/NAME.log``; never raises."""
    command = (step.dry_command or step.command)(out) if dry_run else step.command(out)
    budget = max(1, round(step.budget_s * scale))
    log_path = out / "logs" / f"{step.name}.log"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        # Only the plugins the command names: a machine's own pytest plugins (or ones built for another
        # pytest than the one carried there) cannot change or break the CUDA tests.
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }
    print(f"[gpu_checks] {step.name}: budget {budget} s: {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with log_path.open("w") as log:
        try:
            process = subprocess.Popen(
                command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError as error:
            return Outcome(step.name, f"not run: {error}", 0.0)
        try:
            code = process.wait(timeout=budget)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            _stop(process)
            status = f"timed out after {budget} s"
    seconds = time.perf_counter() - start
    print(f"[gpu_checks] {step.name}: {status} in {seconds:.0f} s (log: {log_path})", flush=True)
    return Outcome(step.name, status, seconds)


def _stop(process: subprocess.Popen) -> None:
    """SIGTERM the step's process group, SIGKILL it after a grace period."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=KILL_GRACE_S)
            return
        except subprocess.TimeoutExpired:
            continue


# -- summary ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Check:
    """One row of the summary: a measured value against its target (``op`` ``<=``/``>=``, or none)."""

    name: str
    measured: float | str | None
    target: float | None = None
    op: str = ""

    @property
    def verdict(self) -> str:
        if self.measured is None:
            return "not measured"
        if isinstance(self.measured, str):
            return {"passed": "PASS", "failed": "FAIL"}.get(self.measured, self.measured)
        if self.target is None:
            return "-"
        ok = self.measured <= self.target if self.op == "<=" else self.measured >= self.target
        return "PASS" if ok else "FAIL"


def _load(out: Path, name: str) -> dict:
    path = out / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _row(result: dict, case: str) -> float | str | None:
    """A row's value; for a row a benchmark skipped (``value: null``), its reason (``skipped: ...``)."""
    row = next((r for r in result.get("rows", []) if r.get("case") == case), None)
    if row is None:
        return None
    unit = str(row.get("unit", ""))
    return unit if row.get("value") is None and unit.startswith("skipped") else row.get("value")


def _or_skip_reason(value: float | None, result: dict, case: str) -> float | str | None:
    """``value``, or when it is missing the reason the benchmark gave for skipping ``case``."""
    reason = _row(result, case)
    return value if value is not None or not isinstance(reason, str) else reason


def junit_outcomes(junit: Path) -> dict[str, str]:
    """``{test file stem: "passed" | "failed" | "skipped"}`` from pytest's JUnit XML, the worst
    outcome of each file's tests."""
    try:
        root = ET.parse(junit).getroot()
    except (OSError, ET.ParseError):
        return {}
    rank = {"passed": 0, "skipped": 1, "failed": 2}
    outcomes: dict[str, str] = {}
    for case in root.iter("testcase"):
        stem = case.get("classname", "").split(".")[-1]
        tags = {child.tag for child in case}
        outcome = "failed" if tags & {"failure", "error"} else "skipped" if "skipped" in tags else "passed"
        if rank[outcome] >= rank[outcomes.get(stem, "passed")]:
            outcomes[stem] = outcome
    return outcomes


def summarise(out: Path, device: str = "cuda") -> list[Check]:
    """The summary rows from the files the steps wrote into ``out`` (missing ones: not measured);
    ``device`` picks the step_overhead and data_throughput rows (``cpu`` for a dry run)."""
    tests = {**junit_outcomes(out / "cuda_tests.xml"), **junit_outcomes(out / "cuda_switch_tests.xml")}
    suffix = "_cuda" if device == "cuda" else ""
    speed, data, steps = _load(out, "cifar_speed"), _load(out, "data_throughput"), _load(out, "step_overhead")
    speed_ratios, data_ratios, step_ratios = (r.get("ratios", {}) for r in (speed, data, steps))
    return [
        Check("sync test: no device sync on quiet steps", tests.get("test_cuda_step_sync")),
        Check("data_on_device: no host->device copies", tests.get("test_cuda_data_on_device")),
        Check("channels_last/compile/bf16 one-step loss", tests.get("test_cuda_speed_switches")),
        Check(
            "recipe epoch / airbench epoch",
            _or_skip_reason(speed_ratios.get("recipe_vs_airbench"), speed, "airbench/epoch_seconds"),
            1.3,
            "<=",
        ),
        Check(
            "recipe fraction of bf16 peak",
            _or_skip_reason(speed_ratios.get("recipe_peak_fraction"), speed, "flop_bound/epoch_seconds"),
            0.40,
            ">=",
        ),
        Check("recipe epoch / plain loop epoch", speed_ratios.get("recipe_vs_plain_loop"), 1.10, "<="),
        Check("recipe epoch seconds", _row(speed, "recipe/epoch_seconds")),
        Check("airbench epoch seconds", _row(speed, "airbench/epoch_seconds")),
        Check("data: device_resident images/s", _row(data, "device_resident/cuda")),
        Check("data: device_resident / per_sample", data_ratios.get("device_resident_vs_per_sample")),
        Check(f"data: batched ({device}) images/s", _row(data, f"batched/{device}")),
        # The 10x target is the CPU's (both paths on the CPU); on a GPU machine the batched path
        # augments on the GPU, so its ratio is reported without a target.
        Check(
            f"data: batched ({device}) / per_sample",
            data_ratios.get("batched_vs_per_sample"),
            *((10.0, ">=") if device == "cpu" else ()),
        ),
        Check(
            f"step: recipe - bare ms (small_cnn, {device})",
            step_ratios.get(f"small_cnn_b64{suffix}/wall/recipe_minus_bare_ms"),
            0.5,
            "<=",
        ),
        Check(
            f"step: callbacks / recipe (small_cnn, {device})",
            step_ratios.get(f"small_cnn_b64{suffix}/wall/callbacks_vs_recipe"),
            1.05,
            "<=",
        ),
        Check(
            f"step: recipe / plain (resnet20, {device})",
            step_ratios.get(f"resnet20_b128{suffix}/wall/recipe_vs_plain_loop"),
            1.10,
            "<=",
        ),
    ]


def print_summary(checks: list[Check], outcomes: list[Outcome]) -> None:
    print("\nsteps")
    for outcome in outcomes:
        print(f"  {outcome.name:18} {outcome.status:28} {outcome.seconds:6.0f} s")
    print(f"\n{'check':44} {'target':>8} {'measured':>14}  verdict")
    for check in checks:
        target = f"{check.op} {check.target:g}" if check.target is not None else ""
        shown = check.measured is not None and not isinstance(check.measured, str)
        measured = f"{check.measured:,.4g}" if shown else ""
        print(f"{check.name:44} {target:>8} {measured:>14}  {check.verdict}")


def write_summary(out: Path, checks: list[Check], outcomes: list[Outcome]) -> Path:
    rows = [{"case": f"step/{o.name}", "value": round(o.seconds, 1), "unit": o.status} for o in outcomes]
    rows += [
        {
            "case": f"check/{c.name}",
            "value": c.measured if not isinstance(c.measured, str) else None,
            "unit": c.verdict,
        }
        for c in checks
    ]
    ratios = {c.name: c.measured for c in checks if isinstance(c.measured, (int, float))}
    targets = {c.name: c.target for c in checks if c.target is not None}
    return write_result("gpu_checks", rows, ratios, targets, out=out / "gpu_checks.json")


def _print_failed_logs(out: Path, outcomes: list[Outcome], lines: int = 25) -> None:
    for outcome in outcomes:
        if outcome.status != "ok":
            log = out / "logs" / f"{outcome.name}.log"
            tail = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else []
            print(f"\n--- last {len(tail)} lines of {log} ---", *tail, sep="\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="output folder for the JSON results, logs and summary")
    parser.add_argument("--cpu-dry-run", action="store_true", help="same pipeline on the CPU, tiny sizes")
    parser.add_argument("--only", nargs="+", choices=[s.name for s in STEPS], help="run only these steps")
    parser.add_argument("--budget-scale", type=float, default=1.0, help="multiply every step's time budget")
    args = parser.parse_args()
    if args.budget_scale <= 0:
        parser.error(f"--budget-scale must be > 0, got {args.budget_scale}")
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        parser.error("torch.cuda.is_available() is False: run on a CUDA machine, or use --cpu-dry-run here")
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
    print(
        f"[gpu_checks] python {platform.python_version()}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), GPU: {gpu}{', CPU dry run' if args.cpu_dry_run else ''}",
        flush=True,
    )
    steps = [s for s in STEPS if not args.only or s.name in args.only]
    outcomes = [run_step(step, args.out, args.cpu_dry_run, args.budget_scale) for step in steps]
    checks = summarise(args.out, "cpu" if args.cpu_dry_run else "cuda")
    path = write_summary(args.out, checks, outcomes)
    _print_failed_logs(args.out, outcomes)
    print_summary(checks, outcomes)
    if args.cpu_dry_run:
        print("(CPU dry run: tiny sizes on a CPU; the verdicts show the plumbing works, not the targets)")
    print(f"\nwrote {path} and the step results in {args.out}")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
