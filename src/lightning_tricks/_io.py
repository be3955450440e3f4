"""Atomic file writes: a reader, or a run killed mid-write, never sees a half-written file.

Every file the project writes (statistics caches, snapshots, exported weights, plots) goes through
:func:`atomic_open`: the bytes land in a temporary file next to the target, are flushed and
``fsync``-ed, and only then ``os.replace`` the target in one step. A kill at any point leaves either
the previous good file or the new complete one, plus at most a stray ``.*.tmp`` file. Hand-written
because ``torch.save`` and ``Figure.savefig`` write in place, and Lightning's helper for this is private.

Example::

    from lightning_tricks._io import atomic_save

    atomic_save({"weights": model.state_dict()}, "out/weights.pt")
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_open", "atomic_save", "atomic_savefig", "atomic_write_bytes"]


def _fsync_dir(folder: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened (Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[IO[bytes]]:
    """Open a binary file that replaces ``path`` only when the ``with`` block finishes without error.

    The parent folder is created. On an exception the temporary file is removed and ``path`` is
    left as it was.

    Example::

        with atomic_open("plot.png") as f:
            fig.savefig(f, format="png")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save(obj, path)``, atomically.

    Example::

        atomic_save(model.state_dict(), "weights.pt")
    """
    with atomic_open(path) as handle:
        torch.save(obj, handle)


def atomic_write_bytes(data: bytes, path: str | os.PathLike) -> None:
    """Write ``data`` to ``path`` atomically.

    Example::

        atomic_write_bytes(json.dumps(result).encode(), "result.json")
    """
    with atomic_open(path) as handle:
        handle.write(data)


def atomic_savefig(figure: Any, path: str | os.PathLike, **kwargs: Any) -> None:
    """``figure.savefig(path, **kwargs)`` atomically; the format comes from the file suffix.

    Example::

        atomic_savefig(fig, "lr_finder.png", dpi=100)
    """
    path = Path(path)
    kwargs.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_open(path) as handle:
        figure.savefig(handle, **kwargs)
