"""Many two-process DDP scenarios in one launch of two CPU processes (gloo).

Starting two processes that each import torch and Lightning and join a process group costs far more
than the few steps a DDP test trains, so the tests marked ``@pytest.mark.ddp(scenario=...)`` share one
launch: each of the two processes joins the process group once and then runs every scenario in turn,
each with its own ``Trainer(strategy="ddp", devices=2)`` (Lightning finds the processes started and the
group initialised, and neither starts nor re-initialises them). A scenario's test then asserts on what
each rank returned (see the ``ddp_scenario`` fixture in conftest.py).

A scenario is a module-level function ``scenario(directory, **params) -> result``, called on both ranks
with its own directory (shared by the ranks) and the test's parameters; the result must pickle. A
scenario that raises on a rank fails its test with that rank's traceback; it ends the launch, and the
scenarios that did not finish run again in a new one.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import shutil
import sys
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from lightning.fabric.plugins.environments.lightning import find_free_network_port

RANKS = (0, 1)
# A collective that waits longer than this on one rank means the other rank left the scenario (for
# example it raised where this one did not): fail the launch instead of waiting for the test timeout.
COLLECTIVE_TIMEOUT = timedelta(minutes=5)


@dataclass(frozen=True)
class ScenarioOutcome:
    """What one scenario left behind: its ``directory``, and per rank its ``results`` and ``stdout``."""

    directory: Path
    results: tuple[Any, ...]
    stdout: tuple[str, ...]


def run_scenarios(
    scenarios: dict[str, Callable[[Path], Any]], root: Path
) -> dict[str, ScenarioOutcome | str]:
    """Run every scenario on two processes started once; per name, its outcome or why it has none.

    A scenario that raises ends its launch; the scenarios it kept from finishing run in a new launch,
    so each test fails or passes on its own scenario only.
    """
    pending = [(name, root / re.sub(r"[^\w.-]+", "_", name).strip("_"), s) for name, s in scenarios.items()]
    outcomes: dict[str, ScenarioOutcome | str] = {}
    while pending:
        for _, directory, _ in pending:
            shutil.rmtree(directory, ignore_errors=True)
            for path in root.glob(f"{directory.name}.rank*"):
                path.unlink()
            directory.mkdir(parents=True)
        try:
            torch.multiprocessing.start_processes(
                _run_on_rank,
                args=(find_free_network_port(), pending),
                nprocs=len(RANKS),
                start_method="spawn",
            )
            launch_error = None
        except Exception as error:  # a scenario raised (its rank wrote why) or a process died
            launch_error = error
        for name, directory, _ in pending:
            outcome = _outcome(name, directory)
            if outcome is not None:
                outcomes[name] = outcome
        unfinished = [job for job in pending if job[0] not in outcomes]
        if len(unfinished) == len(pending):  # not one scenario finished: the launch itself fails
            for name, _, _ in unfinished:
                outcomes[name] = f"DDP scenario {name} did not run: the launch failed: {launch_error}"
            break
        pending = unfinished
    return outcomes


def _outcome(name: str, directory: Path) -> ScenarioOutcome | str | None:
    """What both ranks returned, why the scenario failed, or None where the launch ended before both
    ranks had run it (a rank that waits for a peer that has gone raises too: that is not a failure)."""
    started = all(_record(directory, r, "stdout").exists() for r in RANKS)
    raised = [(r, _record(directory, r, "raised")) for r in RANKS]
    raised = [f"rank {r}:\n{path.read_text()}" for r, path in raised if path.exists()]
    results = [_record(directory, r, "result") for r in RANKS]
    if started and raised:
        return f"DDP scenario {name} raised\n" + "\n".join(raised)
    if all(path.exists() for path in results):
        return ScenarioOutcome(
            directory,
            tuple(pickle.loads(path.read_bytes()) for path in results),
            tuple(_record(directory, r, "stdout").read_text() for r in RANKS),
        )
    return None


def _run_on_rank(rank: int, port: int, jobs: list[tuple[str, Path, Callable[[Path], Any]]]) -> None:
    # LOCAL_RANK tells Lightning the processes were started for it (LightningEnvironment); it then
    # uses the process group initialised here.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK="0", LOCAL_RANK=str(rank))
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=len(RANKS),
        timeout=COLLECTIVE_TIMEOUT,
    )
    environ, threads = dict(os.environ), torch.get_num_threads()
    try:
        for _, directory, scenario in jobs:
            os.chdir(directory)
            try:
                with _stdout_to(_record(directory, rank, "stdout")):
                    result = scenario(directory)
            except BaseException:
                _record(directory, rank, "raised").write_text(traceback.format_exc())
                raise
            _record(directory, rank, "result").write_bytes(pickle.dumps(result))
            # what one scenario set (a global seed in PL_GLOBAL_SEED, a thread count) must not reach the next
            os.environ.clear()
            os.environ.update(environ)
            torch.set_num_threads(threads)
    finally:
        dist.destroy_process_group()


def _record(directory: Path, rank: int, kind: str) -> Path:
    """Where the launch keeps what a rank's scenario returned, raised or printed (written from its
    start on, so it also says the rank started the scenario): next to the scenario's directory, never
    in it (the scenario owns that)."""
    return directory.with_name(f"{directory.name}.rank{rank}.{kind}")


@contextlib.contextmanager
def _stdout_to(path: Path) -> Iterator[None]:
    """Send this process's standard output (the file descriptor, so native writes too) to ``path``."""
    sys.stdout.flush()
    saved = os.dup(1)
    with path.open("w") as file:
        os.dup2(file.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
