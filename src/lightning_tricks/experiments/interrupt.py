"""Ctrl-C during a search: stop at a safe point and leave the study consistent and resumable.

Hand-written because neither Optuna nor Lightning can tell a trial from the bookkeeping around it:
Lightning turns a ``KeyboardInterrupt`` during ``fit`` into ``sys.exit(1)``, and Optuna's
``optimize`` may be writing a trial's result when the signal comes.

The first SIGINT raises ``KeyboardInterrupt`` at once only inside :meth:`GracefulInterrupt.interruptible`
(a running trial, which is then recorded ``FAIL`` and queued again); anywhere else it is remembered
and the worker stops before it claims the next trial. Further SIGINTs are ignored while the worker
cleans up (``kill -9`` still ends it; the study's heartbeat then fails its trial).

Example::

    with GracefulInterrupt() as interrupts:
        with interrupts.interruptible():
            train()
        if interrupts.requested:
            ...  # stop before the next unit of work
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType, TracebackType
from typing import Any


class SearchInterrupted(Exception):
    """The search stopped on Ctrl-C; the study is consistent and the same command resumes it."""


class GracefulInterrupt:
    """SIGINT handler for the duration of a ``with`` block (main thread only, else inert).

    Args:
        on_request: Called once, from the handler, when the first SIGINT arrives (e.g. to pass it on
            to worker processes).
    """

    def __init__(self, on_request: Callable[[], None] | None = None) -> None:
        self.requested = False
        self.on_request = on_request
        self._raise_now = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            return
        self.requested = True
        if self.on_request is not None:
            self.on_request()
        if self._raise_now:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """A block that the first SIGINT interrupts at once (raises ``KeyboardInterrupt`` in it)."""
        if self.requested:
            raise KeyboardInterrupt
        self._raise_now = True
        try:
            yield
        finally:
            self._raise_now = False
