"""Prediction ensembles: average the predicted label distributions of several classifiers.

"Train multiple independent models, average their predicted label distributions": members come from
independently trained checkpoints (:meth:`EnsembleClassifier.from_checkpoints`) or from the snapshots of
one run (:meth:`EnsembleClassifier.from_snapshots`, e.g. the ``snapshot_{i}.pt`` files written by
:class:`lightning_tricks.callbacks.snapshot.SnapshotEnsemble`). This averages *predictions*; averaging
*weights* (EMA, SWA) is a different method that only works along one trajectory.

Bagging trains each member on a bootstrap resample of the training set:
:func:`lightning_tricks.datamodules.resampling.bootstrap_indices`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.nn import functional as F

from lightning_tricks.adapters import inputs_of, logits_of, split_batch
from lightning_tricks.evaluation import ensemble_logits, mean_probabilities

StateDict = dict[str, torch.Tensor]


def _count_outputs(member: nn.Module, example: torch.Tensor | None) -> int | None:
    """The member's number of classes: from a forward pass on ``example``, else ``num_classes``, else the
    last ``nn.Linear``."""
    if example is not None:
        return int(member(example).shape[-1])
    num_classes = getattr(member, "num_classes", None)
    if isinstance(num_classes, int):
        return num_classes
    linears = [m for m in member.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _input_size(member: nn.Module) -> int | None:
    """Input channels/features of the member's first Conv or Linear layer."""
    for module in member.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return module.in_channels
        if isinstance(module, nn.Linear):
            return module.in_features
    return None


def _load_snapshot(snapshot: StateDict | str | os.PathLike) -> StateDict:
    if isinstance(snapshot, (str, os.PathLike)):
        payload = torch.load(snapshot, map_location="cpu", weights_only=True)
        return payload.get("state_dict", payload)
    return snapshot


class EnsembleClassifier(L.LightningModule):
    """Average the softmax outputs of several classifiers (each ``forward`` returns logits, a tuple
    starting with them or a dict with ``logits``; see :mod:`lightning_tricks.adapters`).

    ``forward`` returns the averaged probabilities ``(N, C)``. Usable in ``trainer.predict`` (returns the
    averaged probabilities) and ``trainer.test`` (logs ``test/acc_ensemble`` and ``test/loss_ensemble``,
    the NLL of the averaged probabilities) with batches ``(inputs, targets, ...)`` or dicts
    (:func:`lightning_tricks.adapters.split_batch`).

    Members must agree in number of classes and input size; this is checked at construction with a
    forward pass on ``example_input`` when given (or a member's ``example_input_array``), otherwise from
    ``num_classes`` attributes and the first/last layers.

    Args:
        members: The classifiers, in evaluation order.
        example_input: An input batch for the shape check, e.g. ``torch.zeros(1, 3, 32, 32)``.

    Raises:
        ValueError: When there are no members, or members disagree in number of classes or input size.

    Example::

        from lightning_tricks.ensemble import EnsembleClassifier

        ensemble = EnsembleClassifier.from_checkpoints(["a.ckpt", "b.ckpt"], module_cls=ImageClassifier)
        trainer.test(ensemble, datamodule=dm)                 # test/acc_ensemble
        probs = torch.cat(trainer.predict(ensemble, dataloaders=loader))
    """

    def __init__(self, members: Sequence[nn.Module], example_input: torch.Tensor | None = None) -> None:
        super().__init__()
        if len(members) == 0:
            raise ValueError("`members` must hold at least one model, got an empty sequence")
        self.members = nn.ModuleList(members)
        self.members.eval()
        if example_input is None:
            example_input = getattr(members[0], "example_input_array", None)
            example_input = example_input if isinstance(example_input, torch.Tensor) else None
        self.num_classes = self._check_members(example_input)

    def _check_members(self, example: torch.Tensor | None) -> int | None:
        sizes = [_input_size(m) for m in self.members]
        known = {s for s in sizes if s is not None}
        if len(known) > 1:
            detail = ", ".join(f"member {i}: {s}" for i, s in enumerate(sizes))
            raise ValueError(f"ensemble members disagree in input channels/features ({detail})")
        counts = []
        with torch.no_grad():
            for i, member in enumerate(self.members):
                try:
                    counts.append(_count_outputs(member, example))
                except RuntimeError as err:
                    shape = tuple(example.shape) if example is not None else None
                    raise ValueError(
                        f"ensemble member {i} cannot take inputs of shape {shape}: {err}"
                    ) from err
        known_counts = [c for c in counts if c is not None]
        if len(set(known_counts)) > 1:
            detail = ", ".join(f"member {i}: {c}" for i, c in enumerate(counts))
            raise ValueError(f"ensemble members disagree in number of classes ({detail})")
        return known_counts[0] if known_counts else None

    @classmethod
    def from_snapshots(
        cls,
        model: nn.Module | Callable[[], nn.Module],
        snapshots: Sequence[StateDict | str | os.PathLike],
        example_input: torch.Tensor | None = None,
    ) -> EnsembleClassifier:
        """Build members from ``state_dict`` snapshots (dicts or ``snapshot_{i}.pt`` files).

        Args:
            model: A template model (deep-copied per member) or a factory returning a fresh model.
            snapshots: State dicts, or paths to files holding one (optionally under ``"state_dict"``).
            example_input: See the class.

        Example::

            ensemble = EnsembleClassifier.from_snapshots(model, sorted(Path("ckpts").glob("snapshot_*.pt")))
        """
        members = []
        for snapshot in snapshots:
            member = copy.deepcopy(model) if isinstance(model, nn.Module) else model()
            member.load_state_dict(_load_snapshot(snapshot))
            members.append(member)
        return cls(members, example_input=example_input)

    @classmethod
    def from_checkpoints(
        cls,
        paths: Sequence[str | os.PathLike],
        module_cls: type[L.LightningModule],
        example_input: torch.Tensor | None = None,
        weights_only: bool = True,
        **kwargs: Any,
    ) -> EnsembleClassifier:
        """Load independently trained LightningModule checkpoints as members.

        Args:
            paths: Checkpoint files.
            module_cls: The LightningModule class, loaded with ``module_cls.load_from_checkpoint``.
            example_input: See the class.
            weights_only: Passed to ``load_from_checkpoint``; keep ``True`` unless the hyperparameters
                hold objects that need ``False``.
            **kwargs: Further ``load_from_checkpoint`` arguments (hyperparameter overrides).
        """
        members = [
            module_cls.load_from_checkpoint(p, map_location="cpu", weights_only=weights_only, **kwargs)
            for p in paths
        ]
        return cls(members, example_input=example_input)

    def member_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax outputs of every member, stacked ``(M, N, C)``."""
        return torch.stack([self._logits(member, x).float().softmax(-1) for member in self.members])

    @staticmethod
    def _logits(member: nn.Module, x: Any) -> torch.Tensor:
        return logits_of(member(x), member)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Averaged predicted label distribution ``(N, C)``."""
        return mean_probabilities([self._logits(member, x) for member in self.members])

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        return self(inputs_of(batch, self.members[0]))

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        """Logs ``test/acc_ensemble`` and ``test/loss_ensemble``, as a module's step would under
        :func:`lightning_tricks.evaluation.evaluate_prediction_average`: the cross-entropy of
        :func:`~lightning_tricks.evaluation.ensemble_logits` (the NLL of the averaged probabilities).

        Not routed through ``evaluate_prediction_average``: that re-runs one module's own step on state
        dicts of that same module from a callback, while these members are independent (possibly
        different) modules with no step of their own, so only the averaging is shared."""
        x, y = split_batch(batch, self.members[0])
        logits = ensemble_logits([self._logits(member, x) for member in self.members])
        hard = y if y.ndim == 1 else y.argmax(-1)
        self.log("test/acc_ensemble", (logits.argmax(-1) == hard).float().mean(), sync_dist=True)
        self.log(
            "test/loss_ensemble",
            F.cross_entropy(logits, y.to(logits.dtype) if y.ndim > 1 else y),
            sync_dist=True,
        )
