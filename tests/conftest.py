"""Shared pytest setup: offline W&B, quiet Lightning, and a tests/ import path for ``helpers``.

Under pytest-xdist (``-n auto``) each worker runs torch on one thread (its DDP and subprocess children
inherit ``OMP_NUM_THREADS``), the workers together use the cores, and every test that starts extra
processes runs on one worker, one at a time, so two such tests never compete for the same cores
(pytest below 9.2: see the bound in pyproject.toml).
"""

from __future__ import annotations

import functools
import os
import pickle
import sys
from pathlib import Path

import pytest
import torch
from filelock import FileLock

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, str(Path(__file__).parent))

from ddp_launch import ScenarioOutcome, run_scenarios
from helpers import DDP_TIMEOUT

NO_CUDA = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
# Tests not marked ``ddp`` that still run several worker processes at once.
MULTI_PROCESS_FILES = {"test_search_workers.py", "test_search_ddp.py"}


# tryfirst: pytest-xdist's own hook reads the xdist_group markers added here; registered after this
# conftest, it would otherwise run first and see none. (pytest-xdist 3.8 under pytest 9.2 groups
# nothing at all: pytest-dev/pytest-xdist#1386.)
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    xdist = config.pluginmanager.hasplugin("xdist")
    for item in items:
        ddp = item.get_closest_marker("ddp") is not None
        if ddp and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DDP_TIMEOUT))
        if item.get_closest_marker("cuda") is not None and not cuda:
            item.add_marker(NO_CUDA)
        if xdist and (ddp or item.path.name in MULTI_PROCESS_FILES):
            item.add_marker(pytest.mark.xdist_group("processes"))  # honoured by `--dist loadgroup`


@pytest.fixture(autouse=True)
def _small_threads_and_cwd(tmp_path, monkeypatch):
    """Run each test in its own directory so logs and checkpoints never leak into the repo."""
    monkeypatch.chdir(tmp_path)
    # Lightning's DDP launcher leaves the port it picked in MASTER_PORT; each test picks its own.
    monkeypatch.delenv("MASTER_PORT", raising=False)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _scenario(item: pytest.Item):
    """The scenario of a test marked ``@pytest.mark.ddp(scenario=...)``, bound to the test's parameters."""
    marker = item.get_closest_marker("ddp")
    if marker is None or "scenario" not in marker.kwargs:
        return None
    callspec = getattr(item, "callspec", None)
    return functools.partial(marker.kwargs["scenario"], **(callspec.params if callspec else {}))


@pytest.fixture(scope="session")
def _ddp_launch(request, tmp_path_factory) -> dict:
    """The scenarios of every selected ``@pytest.mark.ddp(scenario=...)`` test, run in one launch.

    Under pytest-xdist the first worker that needs them runs the launch and the others wait for its
    outcomes (pytest-xdist's recipe for a session fixture that runs once), so two launches never
    compete for the cores, even where ``--dist loadgroup`` leaves the tests on several workers.
    """
    scenarios = {item.nodeid: scenario for item in request.session.items if (scenario := _scenario(item))}
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the base directory all workers share
    saved = shared / "ddp_scenarios.pkl"
    with FileLock(shared / "ddp_scenarios.lock"):
        if saved.exists():
            return pickle.loads(saved.read_bytes())
        outcomes = run_scenarios(scenarios, shared / "ddp_scenarios")
        saved.write_bytes(pickle.dumps(outcomes))
    return outcomes


@pytest.fixture
def ddp_scenario(request, _ddp_launch) -> ScenarioOutcome:
    """What this test's ``@pytest.mark.ddp(scenario=...)`` returned and printed on each rank."""
    outcome = _ddp_launch[request.node.nodeid]
    if isinstance(outcome, str):
        pytest.fail(outcome, pytrace=False)
    return outcome
