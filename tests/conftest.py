"""Shared pytest setup: offline W&B, quiet Lightning, and a tests/ import path for ``helpers``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
sys.path.insert(0, str(Path(__file__).parent))

from helpers import DDP_TIMEOUT

NO_CUDA = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here")


def pytest_collection_modifyitems(config, items):
    cuda = torch.cuda.is_available()
    for item in items:
        if item.get_closest_marker("ddp") is not None and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(DDP_TIMEOUT))
        if item.get_closest_marker("cuda") is not None and not cuda:
            item.add_marker(NO_CUDA)


@pytest.fixture(autouse=True)
def _small_threads_and_cwd(tmp_path, monkeypatch):
    """Run each test in its own directory so logs and checkpoints never leak into the repo."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
