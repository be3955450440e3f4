"""Where the inputs, targets and logits are: one small adapter for batches and forward outputs.

Code that runs its own forward passes (prediction averaging in :mod:`lightning_tricks.evaluation`,
:class:`~lightning_tricks.callbacks.SnapshotEnsemble`, :class:`~lightning_tricks.ensemble.EnsembleClassifier`)
reads batches and outputs through these functions. The defaults handle the usual shapes:

- batches: ``(inputs, targets, ...)`` tuples/lists, or dicts with an input key (``image``, ``images``,
  ``input``, ``inputs``, ``x``, ``pixel_values``) and a target key (``label``, ``labels``,
  ``target``, ``targets``, ``y``);
- forward outputs: a logits Tensor, a tuple/list whose first element is the logits, or a dict with
  ``logits``.

A module says otherwise by defining ``split_batch(batch) -> (inputs, targets)`` and/or
``logits_of(output) -> Tensor`` (with ``with_logits(output, logits) -> output`` when its output is
not one of the usual shapes); a callable passed where an adapter is accepted wins over both.

Example::

    class MyModule(L.LightningModule):
        def forward(self, x):
            return {"scores": self.net(x), "features": self.body(x)}

        def logits_of(self, output):          # tells every callback where the logits are
            return output["scores"]

        def with_logits(self, output, logits):
            return {**output, "scores": logits}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import Tensor

INPUT_KEYS = ("image", "images", "input", "inputs", "x", "pixel_values")
TARGET_KEYS = ("label", "labels", "target", "targets", "y")
LOGIT_KEYS = ("logits",)

BatchSplitter = Callable[[Any], tuple[Any, Any]]
LogitsReader = Callable[[Any], Tensor]


def _first_key(mapping: Mapping[str, Any], keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in mapping), None)


def split_batch(batch: Any, module: Any = None, splitter: BatchSplitter | None = None) -> tuple[Any, Any]:
    """``(inputs, targets)`` of a batch: ``splitter``, else ``module.split_batch``, else the default rule.

    Example::

        >>> split_batch({"image": 1, "label": 2})
        (1, 2)
    """
    if splitter is not None:
        return splitter(batch)
    if module is not None and callable(getattr(type(module), "split_batch", None)):
        return module.split_batch(batch)
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, Mapping):
        inputs, targets = _first_key(batch, INPUT_KEYS), _first_key(batch, TARGET_KEYS)
        if inputs is not None and targets is not None:
            return batch[inputs], batch[targets]
        found = list(batch)
    else:
        found = type(batch).__name__
    raise ValueError(
        f"Cannot find inputs and targets in a batch of {found}: expected (inputs, targets, ...) or a dict "
        f"with one of {INPUT_KEYS} and one of {TARGET_KEYS}. Define `split_batch(self, batch)` on the "
        "module returning (inputs, targets)."
    )


def inputs_of(batch: Any, module: Any = None) -> Any:
    """The inputs of a batch that may have no targets (prediction): ``batch[0]``, a dict's input key,
    ``module.split_batch(batch)[0]`` when the module defines it, or the batch itself.

    Example::

        >>> inputs_of({"image": 1}), inputs_of((1,)), inputs_of(1)
        (1, 1, 1)
    """
    if module is not None and callable(getattr(type(module), "split_batch", None)):
        return module.split_batch(batch)[0]
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        key = _first_key(batch, INPUT_KEYS)
        if key is None:
            raise ValueError(
                f"Cannot find inputs in a batch with keys {list(batch)}: expected one of {INPUT_KEYS}. "
                "Define `split_batch(self, batch)` on the module returning (inputs, targets)."
            )
        return batch[key]
    return batch


def logits_of(output: Any, module: Any = None, reader: LogitsReader | None = None) -> Tensor:
    """The logits in a forward output: ``reader``, else ``module.logits_of``, else the default rule.

    Example::

        >>> import torch
        >>> logits_of((torch.ones(1, 3), "aux")).shape
        torch.Size([1, 3])
    """
    if reader is not None:
        found = reader(output)
    elif module is not None and callable(getattr(type(module), "logits_of", None)):
        found = module.logits_of(output)
    elif isinstance(output, (tuple, list)) and output:
        found = output[0]
    elif isinstance(output, Mapping):
        key = _first_key(output, LOGIT_KEYS)
        found = output[key] if key is not None else None
    else:
        found = output
    if not isinstance(found, Tensor) or found.ndim < 1:
        shape = list(output) if isinstance(output, Mapping) else type(output).__name__
        raise ValueError(
            f"Cannot find class logits in a forward output of {shape}: expected a Tensor of shape (N, C), a "
            f"tuple whose first element is one, or a dict with one of {LOGIT_KEYS}. Define "
            "`logits_of(self, output)` on the module returning the logits."
        )
    return found


def with_logits(output: Any, logits: Tensor, module: Any = None) -> Any:
    """``output`` with its logits replaced by ``logits`` (same structure), e.g. an ensemble's.

    Example::

        >>> with_logits({"logits": 1, "aux": 2}, 3)
        {'logits': 3, 'aux': 2}
    """
    if module is not None and callable(getattr(type(module), "with_logits", None)):
        return module.with_logits(output, logits)
    if isinstance(output, tuple):
        return (logits, *output[1:])
    if isinstance(output, list):
        return [logits, *output[1:]]
    if isinstance(output, Mapping):
        key = _first_key(output, LOGIT_KEYS)
        if key is not None:
            return {**output, key: logits}
    if isinstance(output, Tensor):
        return logits
    raise ValueError(
        f"Cannot put logits back into a forward output of {type(output).__name__}. Define "
        "`with_logits(self, output, logits)` on the module."
    )
