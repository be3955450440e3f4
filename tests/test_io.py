"""Atomic writes: a write killed midway, or one that raises, never replaces the last good file."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lightning_tricks._io import atomic_open, atomic_save, atomic_savefig, atomic_write_bytes
from lightning_tricks.datamodules.stats import ImageStatistics

SRC = str(Path(__file__).resolve().parents[1] / "src")

# The child starts an atomic write, pushes half of a large payload to the file, tells the parent
# through stdout, then blocks on stdin until the parent SIGKILLs it: a kill at a known point
# mid-write, without sleeps or timing assumptions.
_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    from lightning_tricks._io import atomic_open
    with atomic_open(sys.argv[1]) as handle:
        handle.write(b"x" * 1_000_000)
        handle.flush()
        print("half-written", flush=True)
        sys.stdin.read()
        handle.write(b"y" * 1_000_000)
    """
)


def test_write_killed_midway_keeps_the_last_good_file(tmp_path):
    target = tmp_path / "weights.pt"
    good = {"w": torch.arange(10.0)}
    atomic_save(good, target)
    env = {**os.environ, "PYTHONPATH": SRC}
    child = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(target)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
    )
    try:
        assert child.stdout.readline().strip() == b"half-written"
        temps = list(tmp_path.glob(".weights.pt.*.tmp"))
        assert len(temps) == 1 and temps[0].stat().st_size == 1_000_000  # the write really was midway
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=120) == -signal.SIGKILL
    finally:
        child.kill()
        child.wait()
    loaded = torch.load(target, weights_only=True)
    assert torch.equal(loaded["w"], good["w"])


def test_exception_inside_the_write_leaves_the_target_and_no_temporary(tmp_path):
    target = tmp_path / "stats.pt"
    atomic_write_bytes(b"good", target)
    with pytest.raises(RuntimeError, match="disk full"), atomic_open(target) as handle:
        handle.write(b"partial")
        raise RuntimeError("disk full")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["stats.pt"]


def test_atomic_save_round_trip_creates_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "obj.pt"
    atomic_save({"x": torch.ones(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(3))
    assert sorted(p.name for p in target.parent.iterdir()) == ["obj.pt"]


def test_atomic_savefig_writes_a_complete_png(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    target = tmp_path / "curve.png"
    atomic_savefig(fig, target, dpi=50)
    plt.close(fig)
    data = target.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data.endswith(b"IEND\xaeB`\x82")


def test_statistics_cache_is_written_atomically(tmp_path, monkeypatch):
    stats = ImageStatistics().fit(torch.rand(16, 3, 4, 4))
    cache = tmp_path / "stats.pt"
    stats.save(cache)
    before = cache.read_bytes()

    def broken_save(obj, handle):
        handle.write(b"half a pickle")
        raise OSError("killed")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="killed"):
        ImageStatistics().fit(torch.rand(16, 3, 4, 4)).save(cache)
    monkeypatch.undo()
    assert cache.read_bytes() == before
    reloaded = ImageStatistics()
    reloaded.load(cache)
    assert torch.equal(reloaded.mean, stats.mean)
