"""A recipe callback that holds a trial at its start, for tests that stop a worker mid-trial.

When ``LIGHTNING_TRICKS_TEST_BLOCK`` names a folder, ``on_train_start`` creates a file named by the
process id in it and waits for a signal (Ctrl-C raises out of the wait; ``kill -9`` ends the process in it).
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
        (Path(marker) / str(os.getpid())).touch()
        while True:
            signal.pause()
