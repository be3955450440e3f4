"""The one place where lightning-tricks touches names Lightning keeps private.

Written against Lightning 2.6.x. Each helper says why no public API does the job; when Lightning
changes one of these names, only this module needs updating.
"""

from __future__ import annotations

from lightning.pytorch.callbacks import EarlyStopping


def early_stopping_checks_on_train_epoch_end(callback: EarlyStopping) -> bool:
    """Whether Lightning's ``EarlyStopping`` runs its check at train-epoch end rather than after validation.

    ``EarlyStopping.setup`` resolves ``check_on_train_epoch_end=None`` into this private flag; a subclass
    that prepares the monitored value just before the check must run at exactly the same point.
    """
    return bool(callback._check_on_train_epoch_end)
