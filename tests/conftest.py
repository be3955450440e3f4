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


@pytest.fixture(autouse=True)
def _small_threads_and_cwd(tmp_path, monkeypatch):
    """Run each test in its own directory so logs and checkpoints never leak into the repo."""
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
