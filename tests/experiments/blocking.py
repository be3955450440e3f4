"""A recipe callback that holds a trial at its start, for tests that stop a worker mid-trial.

When ``LIGHTNING_TRICKS_TEST_BLOCK`` names a file, ``on_train_start`` writes the process id to it
and waits for a signal (Ctrl-C raises out of the wait; ``kill -9`` ends the process in it).
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback

BLOCK_ENV = "LIGHTNING_TRICKS_TEST_BLOCK"


class HoldTrial(Callback):
    def on_train_start(self, trainer, pl_module):
        marker = os.environ.get(BLOCK_ENV)
        if not marker:
            return
        Path(marker).write_text(str(os.getpid()))
        while True:
            signal.pause()
