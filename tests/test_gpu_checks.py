"""benchmarks/gpu_checks.py: a failing or hanging step does not stop the pipeline, and the summary
judges each measured value against its target from the files the steps wrote."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_checks
from _report import write_result

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest">
  <testcase classname="cuda.test_cuda_step_sync" name="test_speedrun_step"/>
  <testcase classname="cuda.test_cuda_speed_switches" name="test_switch[a]"/>
  <testcase classname="cuda.test_cuda_speed_switches" name="test_switch[b]"><failure message="x"/></testcase>
  <testcase classname="cuda.test_cuda_data_on_device" name="test_copies"><skipped message="-"/></testcase>
</testsuite></testsuites>
"""


def test_summary_judges_each_value_against_its_target(tmp_path):
    (tmp_path / "cuda_tests.xml").write_text(JUNIT)
    rows = [{"case": "airbench/epoch_seconds", "value": 0.2, "unit": "s"}]
    ratios = {"recipe_vs_airbench": 1.5, "recipe_peak_fraction": 0.45, "recipe_vs_plain_loop": 1.02}
    write_result("cifar_speed", rows, ratios, {}, out=tmp_path / "cifar_speed.json")
    step_ratios = {
        "small_cnn_b64_cuda/wall/recipe_minus_bare_ms": 0.7,
        "small_cnn_b64/wall/recipe_minus_bare_ms": 0.1,
    }
    write_result("step_overhead", [], step_ratios, {}, out=tmp_path / "step_overhead.json")

    verdicts = {check.name: check.verdict for check in gpu_checks.summarise(tmp_path, "cuda")}

    assert verdicts["sync test: no device sync on quiet steps"] == "PASS"
    assert verdicts["channels_last/compile/bf16 one-step loss"] == "FAIL"  # one of two failed
    assert verdicts["data_on_device: no host->device copies"] == "skipped"
    assert verdicts["recipe epoch / airbench epoch"] == "FAIL"  # 1.5 > 1.3
    assert verdicts["recipe fraction of bf16 peak"] == "PASS"  # 0.45 >= 0.40
    assert verdicts["recipe epoch / plain loop epoch"] == "PASS"
    assert verdicts["step: recipe - bare ms (small_cnn, cuda)"] == "FAIL"  # the CUDA row, not the CPU one
    assert verdicts["data: device_resident images/s"] == "not measured"  # no data_throughput.json


def test_summary_gives_the_benchmarks_skip_reason(tmp_path):
    rows = [{"case": "airbench/epoch_seconds", "value": None, "unit": "skipped: airbench not installed"}]
    write_result("cifar_speed", rows, {"recipe_vs_plain_loop": 1.0}, {}, out=tmp_path / "cifar_speed.json")
    checks = {check.name: check for check in gpu_checks.summarise(tmp_path, "cuda")}
    assert checks["recipe epoch / airbench epoch"].verdict == "skipped: airbench not installed"


def test_a_failing_and_a_hanging_step_are_reported_and_stopped(tmp_path):
    (tmp_path / "logs").mkdir()
    python = sys.executable
    failing = gpu_checks.Step("failing", lambda out: [python, "-c", "print('boom'); raise SystemExit(3)"], 60)
    hanging = gpu_checks.Step("hanging", lambda out: [python, "-c", "import time; time.sleep(60)"], 1)
    outcomes = [gpu_checks.run_step(step, tmp_path, dry_run=False, scale=1.0) for step in (failing, hanging)]
    assert [o.status for o in outcomes] == ["failed (exit 3)", "timed out after 1 s"]
    assert outcomes[1].seconds < 30
    assert "boom" in (tmp_path / "logs" / "failing.log").read_text()
