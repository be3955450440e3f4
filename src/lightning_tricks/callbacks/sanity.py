"""The error the pre-training sanity checks raise with ``on_fail="raise"``."""

from __future__ import annotations


class SanityCheckError(RuntimeError):
    """Raised by a sanity check with ``on_fail="raise"`` when the model fails it.

    Example::

        try:
            trainer.fit(model, datamodule=dm)
        except SanityCheckError as err:
            print(err)  # what failed, the measured values and the likely causes
    """
