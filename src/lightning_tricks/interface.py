"""What the callbacks read from a LightningModule beyond Lightning's own API, declared in one place.

Every member is optional: a module that lacks one still works with every callback, which then falls
back to a generic behaviour and says so once (on rank 0). The recipe's
:class:`~lightning_tricks.recipes.ImageClassifier` implements all of them; a user's own module can
implement any subset to get the full checks.

======================================  =========================================================
member                                  read by (and what happens without it)
======================================  =========================================================
``data_loss(logits, targets)``          InitLossCheck, OverfitTinyBatch, TrainingDiagnostics:
                                        the loss without penalties (fallback: cross-entropy).
``penalty()``                           InitLossCheck: the regularization loss added to the data
                                        loss (without it the crank-up check is skipped).
``regularization_scaled(factor)``       InitLossCheck (crank-up check), OverfitTinyBatch and
                                        TrainingDiagnostics (regularization off); fallback: only
                                        dropout layers are switched off.
``num_classes``                         InitLossCheck, OverfitTinyBatch: checked against the
                                        logits' width (fallback: the width is trusted).
``expected_initial_loss()``             InitLossCheck, TrainingDiagnostics: ``(value, formula)``
                                        of the data loss at near-zero logits (fallback:
                                        cross-entropy's ``ln(C)``; see
                                        :func:`expected_initial_loss`). Not announced when
                                        missing: ``ln(C)`` is right for a cross-entropy module.
======================================  =========================================================

Example:

    >>> import contextlib
    >>> import lightning as L
    >>> import torch.nn.functional as F
    >>> from lightning_tricks.interface import ModuleInterface, missing_members
    >>> class MyClassifier(L.LightningModule):
    ...     num_classes = 10
    ...
    ...     def data_loss(self, logits, targets):
    ...         return F.cross_entropy(logits, targets)
    ...
    ...     def penalty(self):
    ...         return 1e-4 * sum(p.pow(2).sum() for p in self.parameters())
    ...
    ...     @contextlib.contextmanager
    ...     def regularization_scaled(self, factor):
    ...         yield  # scale your own penalty/dropout coefficients by `factor` here
    >>> isinstance(MyClassifier(), ModuleInterface), missing_members(MyClassifier())
    (True, [])
    >>> missing_members(L.LightningModule())
    ['data_loss', 'penalty', 'regularization_scaled', 'num_classes']
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

from torch import Tensor

MEMBERS = ("data_loss", "penalty", "regularization_scaled", "num_classes")

#: Checkpoint key under which a module may store its hyper-parameters as configured, before callbacks
#: rewrote any (``LRFinder`` records the rate it applied in ``hparams``); ``--ckpt_path`` compares the
#: user's config with these rather than with ``hyper_parameters``.
CONFIGURED_HPARAMS_KEY = "lightning_tricks_configured_hyper_parameters"


@runtime_checkable
class ModuleInterface(Protocol):
    """The optional members callbacks read from a LightningModule (see the module docstring).

    Attributes:
        num_classes: number of classes, the width of the logits.
    """

    num_classes: int

    def data_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """Mean loss of ``logits`` ``(N, C)`` against class indices ``(N,)`` or soft targets ``(N, C)``,
        without penalties."""
        ...

    def penalty(self) -> Tensor:
        """The regularization term the training loss adds to ``data_loss`` (e.g. L1/L2), a scalar."""
        ...

    def regularization_scaled(self, factor: float) -> AbstractContextManager[Any]:
        """Context manager scaling every regularization (penalties, dropout, label smoothing) by
        ``factor`` for its duration; ``0`` turns all of it off."""
        ...


def missing_members(module: Any, members: tuple[str, ...] = MEMBERS) -> list[str]:
    """The members of :class:`ModuleInterface` that ``module`` does not implement, in declaration order.

    Example:

        >>> import torch
        >>> missing_members(torch.nn.Linear(2, 2), ("data_loss", "num_classes"))
        ['data_loss', 'num_classes']
    """
    missing = []
    for name in members:
        value = getattr(module, name, None)
        if name == "num_classes":
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = callable(value)
        if not ok:
            missing.append(name)
    return missing


def fallback_message(callback: str, module: Any, members: tuple[str, ...], consequence: str) -> str | None:
    """One line telling the user which members ``module`` lacks and what ``callback`` does instead.

    Returns ``None`` when nothing is missing.

    Example:

        >>> import torch
        >>> print(fallback_message("InitLossCheck", torch.nn.Linear(2, 2), ("penalty",), "it is skipped"))
        InitLossCheck: Linear does not implement `penalty` (see ...ModuleInterface), so it is skipped.
    """
    missing = missing_members(module, members)
    if not missing:
        return None
    names = ", ".join(f"`{m}`" for m in missing)
    return (
        f"{callback}: {type(module).__name__} does not implement {names} (see "
        f"lightning_tricks.interface.ModuleInterface), so {consequence}."
    )


def attached_trainer(module: Any) -> Any:
    """The Trainer ``module`` is attached to, or ``None`` when a step is called by hand outside one
    (Lightning's ``module.trainer`` raises then).

    Example::

        trainer = attached_trainer(model)
        step = 0 if trainer is None else trainer.global_step
    """
    try:
        return module.trainer
    except RuntimeError:
        return None


def expected_initial_loss(module: Any, num_classes: int) -> tuple[float, str]:
    """The data loss a freshly initialised ``num_classes``-way classifier should show, and its formula.

    The module's own ``expected_initial_loss()`` when it has one (e.g. the recipe's hinge loss),
    otherwise cross-entropy's ``ln(C)``: uniform predictions cost ``-log(1/C)``.

    Example:

        >>> import torch
        >>> expected_initial_loss(torch.nn.Linear(2, 10), 10)
        (2.302585092994046, 'ln(10) = 2.3026')
    """
    own = getattr(module, "expected_initial_loss", None)
    if callable(own):
        value, formula = own()
        return float(value), str(formula)
    return cross_entropy_initial_loss(num_classes)


def cross_entropy_initial_loss(num_classes: int) -> tuple[float, str]:
    """Cross-entropy at uniform predictions, ``ln(C)``, and its formula.

    Example:

        >>> cross_entropy_initial_loss(10)[1]
        'ln(10) = 2.3026'
    """
    value = math.log(num_classes)
    return value, f"ln({num_classes}) = {value:.4f}"
