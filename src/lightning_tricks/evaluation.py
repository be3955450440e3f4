"""One way to evaluate alternative weights: the module's own validation/test step on other weights or on
averaged predictions, logged under a suffix.

Used by :class:`~lightning_tricks.callbacks.EMA` (swapped-in weights, ``val/acc_ema``),
:class:`~lightning_tricks.callbacks.SnapshotEnsemble` (averaged predictions of snapshots,
``val/acc_ensemble``, ``val/acc_snapshot_3``) and :mod:`lightning_tricks.ensemble` (averaged
predicted distributions). Every pass:

- runs the stage's dataloaders (honouring ``limit_val_batches``/``limit_test_batches``) through
  ``trainer.strategy.batch_to_device`` (DataModule transfer hooks apply) and
  ``trainer.strategy.validation_step``/``test_step`` (precision and DDP wrapping apply);
- re-keys every ``self.log(name, ...)`` of the module to ``name + suffix`` (with
  ``/dataloader_idx_i`` after it for several dataloaders), at epoch level, weighted by batch size and
  reduced across ranks (``Metric`` values: the clone's ``compute()`` at the end of the pass);
- replaces the module's torchmetrics ``Metric``/``MetricCollection`` attributes by fresh clones, one
  set per suffix and dataloader, so neither the module's own metric state nor the runs of the pass
  are mixed, and puts the originals back after each step, also when it raises.

Only the step runs: values a module accumulates itself and logs from ``on_*_epoch_end`` get no
suffixed twin. Hand-written because Lightning has no public "evaluate these weights under another
name" (its loops log under the module's names and reset the module's metrics).

Example::

    from lightning_tricks.evaluation import evaluate_weights, evaluate_prediction_average

    with ema.swapped():                                   # in on_validation_epoch_end
        evaluate_weights(trainer, pl_module, "val", suffix="_ema")
    evaluate_prediction_average(trainer, pl_module, "val", {"_snapshot_1": s1, "_snapshot_2": s2})
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.data import extract_batch_size
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.func import functional_call
from torchmetrics import Metric, MetricCollection

Stage = Literal["val", "test"]


def mean_probabilities(outputs: Sequence[Tensor]) -> Tensor:
    """The averaged predicted distribution ``mean_i softmax(outputs_i)`` in float32, ``(N, C)``.

    Example::

        >>> mean_probabilities([torch.zeros(1, 2), torch.tensor([[0.0, 100.0]])])
        tensor([[0.2500, 0.7500]])
    """
    return torch.stack([o.float().softmax(-1) for o in outputs]).mean(0)


def ensemble_logits(outputs: Sequence[Tensor]) -> Tensor:
    """``log(mean_i softmax(outputs_i))``: logits whose softmax is the averaged distribution.

    A module's cross-entropy on them is the NLL of the averaged probabilities, its argmax the
    ensemble's prediction. Zero probabilities are clamped to the smallest positive float.
    """
    probs = mean_probabilities(outputs)
    return probs.clamp_min(torch.finfo(probs.dtype).tiny).log()


def eval_dataloaders(trainer: pl.Trainer, stage: Stage) -> list[tuple[int, Any, float]]:
    """``(dataloader_idx, loader, batch limit)`` of every ``val`` or ``test`` dataloader."""
    loaders = trainer.val_dataloaders if stage == "val" else trainer.test_dataloaders
    limits = list(trainer.num_val_batches if stage == "val" else trainer.num_test_batches)
    if isinstance(loaders, Mapping):
        loaders = list(loaders.values())
    elif not isinstance(loaders, (list, tuple)):
        loaders = [loaders]
    return [(i, loader, limits[i] if i < len(limits) else math.inf) for i, loader in enumerate(loaders)]


class MetricClones:
    """Fresh clones of a module's torchmetrics Metric/MetricCollection attributes, one set per key.

    :meth:`use` puts the set of a key (``"_ensemble/dataloader_idx_0"``) in place of the module's
    own metric objects, so each suffix and dataloader accumulates its own state; :meth:`restore`
    puts the module's objects back.
    """

    def __init__(self, pl_module: nn.Module) -> None:
        self.locations: list[tuple[nn.Module, str, nn.Module]] = []
        self.sets: dict[str, list[nn.Module]] = {}

        def walk(module: nn.Module) -> None:
            for name, child in list(module.named_children()):
                if isinstance(child, (Metric, MetricCollection)):
                    self.locations.append((module, name, child))
                else:
                    walk(child)

        walk(pl_module)

    def use(self, key: str) -> None:
        if key not in self.sets:
            self.sets[key] = [original.clone() for _, _, original in self.locations]
            for clone in self.sets[key]:
                clone.reset()
        for (parent, name, _), clone in zip(self.locations, self.sets[key], strict=True):
            # setattr on an existing child name replaces the registered submodule in place.
            setattr(parent, name, clone)

    def restore(self) -> None:
        for parent, name, original in self.locations:
            setattr(parent, name, original)


def _batch_size(batch: Any) -> int:
    try:
        return extract_batch_size(batch)
    except MisconfigurationException:
        return 1


LogArguments = dict[str, Any]


class SuffixedLog:
    """Stands in for ``pl_module.log`` during a pass: logs ``name + suffix`` once per epoch.

    Tensor and number values are logged per batch, weighted by batch size and reduced across ranks;
    ``Metric`` values (the pass's clones) are computed once in :meth:`log_metrics`. :attr:`arguments`
    holds the ``self.log`` arguments of every name logged, so a caller can log cached values again
    with the same arguments.
    """

    def __init__(self, pl_module: pl.LightningModule, clones: MetricClones) -> None:
        self.pl_module = pl_module
        self.clones = clones
        self.original = pl_module.log
        self.signature = inspect.signature(self.original)
        self.arguments: dict[str, LogArguments] = {}
        self.metrics: dict[str, Metric] = {}
        self.suffix = ""
        self.batch: Any = None

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        bound = self.signature.bind(*args, **kwargs)
        bound.apply_defaults()
        params = bound.arguments
        name, value = f"{params['name']}{self.suffix}", params["value"]
        self.arguments[name] = arguments = {
            "prog_bar": params["prog_bar"],
            "logger": params["logger"],
            "on_step": False,
            "on_epoch": True,
            "reduce_fx": params["reduce_fx"],
            "sync_dist": True,
            "rank_zero_only": params["rank_zero_only"],
            "add_dataloader_idx": False,
        }
        if isinstance(value, Metric):
            self.metrics[name] = value
            return
        batch_size = params.get("batch_size") or _batch_size(self.batch)
        self.original(name, value, batch_size=batch_size, **arguments)

    @contextmanager
    def routing(self, suffix: str, batch: Any) -> Iterator[None]:
        """Within the context, ``pl_module.log(name, ...)`` logs ``name + suffix``."""
        had_attr = "log" in self.pl_module.__dict__
        saved = self.pl_module.__dict__.get("log")
        self.suffix, self.batch = suffix, batch
        self.clones.use(suffix)
        self.pl_module.log = self  # type: ignore[method-assign]
        try:
            yield
        finally:
            self.clones.restore()
            if had_attr:
                self.pl_module.log = saved  # type: ignore[method-assign]
            else:
                del self.pl_module.log

    def log_metrics(self) -> None:
        """Logs the epoch value of every Metric logged during the pass (``Metric.compute`` syncs ranks)."""
        for name, metric in self.metrics.items():
            self.original(name, metric.compute(), **self.arguments[name])


def _eval_batches(trainer: pl.Trainer, stage: Stage) -> Iterator[tuple[Any, int, int, bool]]:
    """``(device batch, batch_idx, dataloader_idx, several loaders)`` of the stage's dataloaders."""
    loaders = eval_dataloaders(trainer, stage)
    multi = len(loaders) > 1
    for idx, loader, limit in loaders:
        batches = loader if math.isinf(limit) else itertools.islice(loader, int(limit))
        for batch_idx, batch in enumerate(batches):
            yield trainer.strategy.batch_to_device(batch, dataloader_idx=idx), batch_idx, idx, multi


@contextmanager
def _evaluation_pass(pl_module: pl.LightningModule) -> Iterator[SuffixedLog]:
    with isolate_rng(include_cuda=True), torch.no_grad():
        log = SuffixedLog(pl_module, MetricClones(pl_module))
        yield log
        log.log_metrics()


def _run_step(
    trainer: pl.Trainer,
    log: SuffixedLog,
    stage: Stage,
    suffix: str,
    batch: Any,
    batch_idx: int,
    idx: int,
    multi: bool,
) -> None:
    step = trainer.strategy.validation_step if stage == "val" else trainer.strategy.test_step
    args = (batch, batch_idx, idx) if multi else (batch, batch_idx)
    with log.routing(suffix + (f"/dataloader_idx_{idx}" if multi else ""), batch):
        step(*args)


def evaluate_weights(
    trainer: pl.Trainer, pl_module: pl.LightningModule, stage: Stage, suffix: str
) -> dict[str, LogArguments]:
    """Runs the ``stage`` step on the module's current weights, logging ``name + suffix``.

    Swap the weights to evaluate in around the call (e.g. ``with ema.swapped():``). Runs without
    gradients and under :func:`~lightning.pytorch.utilities.seed.isolate_rng`, so the training RNG
    stream is the same as without the pass. Returns the ``self.log`` arguments of each name logged.
    """
    with _evaluation_pass(pl_module) as log:
        for batch, batch_idx, idx, multi in _eval_batches(trainer, stage):
            _run_step(trainer, log, stage, suffix, batch, batch_idx, idx, multi)
    return log.arguments


class _MemberForward:
    """Stands in for ``pl_module.forward``: the members' outputs (one member: its logits; several:
    :func:`ensemble_logits`), each computed by the module's own ``forward`` on that member's weights.

    Outputs are remembered per input tensor within a batch, so the ensemble and the single-member
    steps share one forward pass per member.
    """

    def __init__(self, pl_module: nn.Module, states: Mapping[str, Mapping[str, Tensor]]) -> None:
        self.pl_module = pl_module
        self.forward = type(pl_module).forward.__get__(pl_module)
        self.states = states
        self.members: list[str] = list(states)
        self.cache: dict[tuple[str, tuple[int, ...]], Tensor] = {}
        self._inside = False

    def _member_output(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        key = (name, tuple(id(a) for a in args))
        if key not in self.cache:
            self._inside = True
            try:
                output = functional_call(self.pl_module, self.states[name], args, kwargs)
            finally:
                self._inside = False
            if not isinstance(output, Tensor):
                raise MisconfigurationException(
                    f"Averaging predictions needs a forward that returns logits (a Tensor), got "
                    f"{type(output).__name__} from {type(self.pl_module).__name__}.forward"
                )
            self.cache[key] = output
        return self.cache[key]

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        if self._inside:  # functional_call calls the module, i.e. this object: run the real forward
            return self.forward(*args, **kwargs)
        outputs = [self._member_output(name, args, kwargs) for name in self.members]
        return outputs[0] if len(outputs) == 1 else ensemble_logits(outputs)

    @contextmanager
    def installed(self, members: Sequence[str]) -> Iterator[None]:
        self.members = list(members)
        self.pl_module.forward = self  # type: ignore[method-assign]
        try:
            yield
        finally:
            del self.pl_module.forward


def evaluate_prediction_average(
    trainer: pl.Trainer,
    pl_module: pl.LightningModule,
    stage: Stage,
    members: Mapping[str, Mapping[str, Tensor]],
    suffix: str = "_ensemble",
) -> dict[str, LogArguments]:
    """Runs the ``stage`` step on the averaged predictions of several weight sets, and on each one.

    ``members`` maps a suffix (``"_snapshot_3"``) to a ``state_dict`` of the module. For every batch,
    the step runs once with the module's ``forward`` returning :func:`ensemble_logits` of the
    members (logged as ``name + suffix``: ``val/acc_ensemble``; a plain cross-entropy becomes the
    NLL of the averaged probabilities) and once per member with that member's logits (``name +
    member suffix``: ``val/acc_snapshot_3``). Each member's ``forward`` runs once per batch, through
    ``torch.func.functional_call``: the live weights are never written. The members' tensors are on
    the module's device during the pass. ``forward`` must return logits. Returns the ``self.log``
    arguments of each name logged.

    Example::

        evaluate_prediction_average(trainer, pl_module, "test", {"_snapshot_1": s1, "_snapshot_2": s2})
    """
    if not members:
        raise ValueError("`members` must hold at least one state_dict, got none")
    names = {n for n, _ in pl_module.named_parameters()} | {n for n, _ in pl_module.named_buffers()}
    device = pl_module.device
    states = {
        key: {k: v.to(device) for k, v in state.items() if k in names} for key, state in members.items()
    }
    forward = _MemberForward(pl_module, states)
    runs = [(suffix, list(states)), *((key, [key]) for key in states)]
    with _evaluation_pass(pl_module) as log:
        for batch, batch_idx, idx, multi in _eval_batches(trainer, stage):
            forward.cache.clear()
            for run_suffix, run_members in runs:
                with forward.installed(run_members):
                    _run_step(trainer, log, stage, run_suffix, batch, batch_idx, idx, multi)
        forward.cache.clear()
    return log.arguments
