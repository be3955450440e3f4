"""Shared pytest setup: offline W&B, quiet Lightning, and a tests/ import path for ``helpers``.

Under pytest-xdist (``-n auto``) each worker runs torch on one thread (its DDP and subprocess children
inherit ``OMP_NUM_THREADS``), the workers together use the cores, and every test that starts extra
processes runs on one worker, one at a time, so two such tests never compete for the same cores.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
sys.path.insert(0, str(Path(__file__).parent))

from helpers import DDP_TIMEOUT

NO_CUDA = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")
# Tests not marked ``ddp`` that still run several worker processes at once.
MULTI_PROCESS_FILES = {"test_search_workers.py", "test_search_ddp.py"}


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
