"""Read the learning curves and the signal at initialization, and say what is wrong in plain words.

The detectors are pure functions over sequences of numbers, so they can be applied to any curve
(and are unit-tested on synthetic ones); :class:`TrainingDiagnostics` records the curves during
``fit``, runs the detectors and prints a summary table at the end.

Example::

    from lightning_tricks.callbacks.diagnostics import detect_flat

    detect_flat([2.30, 2.30, 2.29, 2.30, 2.30, 2.29, 2.30, 2.30])  # -> Finding(check="flat", ...)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_tricks.callbacks._sanity import (
    classifier_forward,
    data_loss,
    draw_batches,
    regularization_off,
    split_batch,
)
from lightning_tricks.callbacks._training_state import preserved_training_state

SEVERITIES: tuple[str, ...] = ("error", "warning")
_PROBED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class Finding:
    """One problem seen in the curves.

    Args:
        check: Short name of the detector (``"nan"``, ``"explosion"``, ``"flat"``, ...).
        severity: ``"error"`` (the run is broken) or ``"warning"`` (the run is likely wasting time).
        message: What was seen, with numbers.
        cause: The likely cause, in one sentence.
        fix: What to do, in one sentence.

    Example::

        Finding("flat", "warning", "loss 2.30 -> 2.29", "learning rate too low", "raise it 3-10x")
    """

    check: str
    severity: str
    message: str
    cause: str
    fix: str


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def detect_nonfinite(losses: Sequence[float], name: str = "training loss") -> Finding | None:
    """Flag the first NaN or infinite loss.

    Example::

        detect_nonfinite([2.3, 1.9, float("nan")]).message  # "the training loss became nan at point 2"
    """
    for i, value in enumerate(losses):
        if not math.isfinite(value):
            return Finding(
                "nan",
                "error",
                f"the {name} became {value} at point {i}",
                "the learning rate is too high, or an operation overflows (log of 0, division by 0, fp16)",
                "lower the learning rate 3-10x, add warm-up or gradient clipping, check the loss for log(0)",
            )
    return None


def detect_explosion(
    losses: Sequence[float], factor: float = 3.0, name: str = "training loss"
) -> Finding | None:
    """Flag a loss that ever exceeds ``factor`` times the first (finite) value.

    Example::

        detect_explosion([2.3, 1.9, 7.5]).check  # "explosion": 7.5 > 3 * 2.3
    """
    finite = _finite(losses)
    if len(finite) < 2 or finite[0] <= 0:
        return None
    peak = max(finite[1:])
    if peak > factor * finite[0]:
        return Finding(
            "explosion",
            "error",
            f"the {name} rose to {peak:.4g}, more than {factor:g}x its first value {finite[0]:.4g}",
            "the learning rate is too high, so the updates overshoot and diverge",
            "lower the learning rate by 3-10x (or add warm-up / gradient clipping)",
        )
    return None


def detect_flat(
    losses: Sequence[float],
    min_decrease: float = 0.05,
    window: int | None = None,
    name: str = "training loss",
) -> Finding | None:
    """Flag a loss whose last window is not ``min_decrease`` (relative) below its first window.

    ``window`` defaults to a fifth of the curve; curves shorter than two windows (or 4 points) pass.

    Example::

        detect_flat([2.30, 2.31, 2.29, 2.30, 2.30]).check  # "flat"
    """
    values = _finite(losses)
    window = window or max(1, len(values) // 5)
    if len(values) < max(4, 2 * window):
        return None
    start = sum(values[:window]) / window
    end = sum(values[-window:]) / window
    if start <= 0:
        return None
    decrease = (start - end) / start
    if decrease < min_decrease:
        return Finding(
            "flat",
            "warning",
            f"the {name} went from {start:.4g} to {end:.4g} ({decrease:+.1%}) over {len(values)} points",
            "the learning rate is too low (or the gradients do not reach the weights)",
            "raise the learning rate by 3-10x or run an LR range test; check that layers are not frozen",
        )
    return None


def detect_overfitting(
    train_losses: Sequence[float], val_losses: Sequence[float], patience: int = 2, min_rise: float = 0.02
) -> Finding | None:
    """Flag validation loss rising for ``patience`` evaluations past its minimum while training loss falls.

    ``train_losses[i]`` is the training loss over the period that ended at evaluation ``i``.

    Example::

        detect_overfitting([2.0, 1.0, 0.6, 0.3], [2.1, 1.2, 1.4, 1.6]).check  # "overfitting"
    """
    n = min(len(train_losses), len(val_losses))
    if n < patience + 1:
        return None
    train, val = list(train_losses[:n]), list(val_losses[:n])
    if not all(math.isfinite(v) for v in val + train):
        return None
    best = min(range(n), key=val.__getitem__)
    if n - 1 - best >= patience and val[-1] > val[best] * (1 + min_rise) and train[-1] < train[best]:
        return Finding(
            "overfitting",
            "warning",
            f"validation loss rose from {val[best]:.4g} (evaluation {best}) to {val[-1]:.4g} while training "
            f"loss fell from {train[best]:.4g} to {train[-1]:.4g}",
            "the model is memorising the training set (overfitting)",
            "add regularization (weight decay, dropout, augmentation), get more data, or stop early",
        )
    return None


def detect_underfitting(
    train_loss: float, val_loss: float, reference: float, max_fraction: float = 0.5, max_gap: float = 0.1
) -> Finding | None:
    """Flag final losses that are both still above ``max_fraction * reference`` and close to each other.

    ``reference`` is the loss at initialization (or ``ln C`` for a C-class classifier).

    Example::

        detect_underfitting(1.8, 1.85, reference=2.3).check  # "underfitting"
    """
    values = (train_loss, val_loss, reference)
    if not all(math.isfinite(v) for v in values) or reference <= 0 or train_loss <= 0:
        return None
    gap = abs(val_loss - train_loss) / train_loss
    if train_loss > max_fraction * reference and gap <= max_gap:
        return Finding(
            "underfitting",
            "warning",
            f"training loss {train_loss:.4g} and validation loss {val_loss:.4g} are close ({gap:.0%} apart) "
            f"and still above {max_fraction:.0%} of the initial {reference:.4g}",
            "the model is underfitting: too little capacity, too few steps, or too much regularization",
            "train longer, use a bigger model, or reduce regularization",
        )
    return None


def detect_init_loss(initial_loss: float, num_classes: int, tolerance: float = 0.5) -> Finding | None:
    """Flag an initial cross-entropy more than ``tolerance`` (relative) away from ``ln(num_classes)``.

    Example::

        detect_init_loss(9.0, num_classes=10).check  # "init_loss": ln(10) = 2.30
    """
    if num_classes < 2 or not math.isfinite(initial_loss):
        return None
    expected = math.log(num_classes)
    if abs(initial_loss - expected) > tolerance * expected:
        return Finding(
            "init_loss",
            "warning",
            f"the loss at initialization is {initial_loss:.4g}, expected about "
            f"ln({num_classes}) = {expected:.4g}",
            "the initial predictions are far from uniform (too-large initial weights or un-normalised inputs)"
            if initial_loss > expected
            else "the model beats chance before training (labels leak into inputs, or trained weights)",
            "use He/Glorot initialization with a small last layer and normalised inputs",
        )
    return None


def detect_variance_drift(
    variances: Sequence[float],
    layers: Sequence[str] | None = None,
    factor: float = 100.0,
    kind: str = "activation",
) -> Finding | None:
    """Flag a variance that grows or shrinks by more than ``factor`` from the first to the last layer.

    ``variances`` are in the order the signal flows: forward order for activations, backward order
    (last layer first) for gradients.

    Example::

        detect_variance_drift([1.0, 100.0, 1e4], ["fc1", "fc2", "fc3"]).message  # "... grows 1e+04x ..."
    """
    values = list(variances)
    if len(values) < 2 or not all(math.isfinite(v) for v in values) or values[0] <= 0:
        return None
    ratio = values[-1] / values[0]
    if 1 / factor <= ratio <= factor:
        return None
    names = list(layers) if layers is not None else [str(i) for i in range(len(values))]
    direction = "grows" if ratio > factor else "shrinks"
    return Finding(
        f"{kind}_variance",
        "warning",
        f"the {kind} variance {direction} {ratio:.3g}x from {names[0]} ({values[0]:.3g}) to {names[-1]} "
        f"({values[-1]:.3g}) at initialization",
        f"the weight initialization does not preserve the signal "
        f"({'exploding' if ratio > 1 else 'vanishing'} {kind}s)",
        "use He (ReLU) or Glorot (tanh) initialization, or add normalization layers",
    )


class TrainingDiagnostics(Callback):
    """Watch the loss curves and the signal at initialization; explain what looks wrong.

    Records the training loss at every step, the training loss averaged since the last evaluation and
    the validation loss at every evaluation, and at the start of a fresh fit the per-layer variance of
    Linear/Conv outputs and of their gradients on one training batch (with regularization off; all
    state restored bit for bit, RNG isolated). At the end of ``fit`` it runs the detectors of this
    module, prints a table on rank 0, sends it to the logger (``log_table`` as on ``WandbLogger``, or
    TensorBoard text) and keeps the results in :attr:`findings`. NaN and explosions are also warned
    about at the end of the epoch they happen in. Curves and findings are checkpointed, so a resumed
    run keeps its history.

    Args:
        train_metric: Logged training loss; its ``_step`` variant (logged with ``on_step=True,
            on_epoch=True``) is read, else the loss returned by ``training_step``, else the metric.
        val_metric: Logged validation loss.
        explosion_factor: Loss above this multiple of the first loss is an explosion (``> 1``).
        min_decrease: Relative decrease below which the training loss is flat (``(0, 1)``).
        overfit_patience: Evaluations of rising validation loss that count as overfitting (``>= 1``).
        underfit_fraction: Final losses above this fraction of the initial loss count as underfitting
            when train and val are close (``(0, 1)``).
        variance_factor: First-to-last-layer variance ratio that flags a bad initialization (``> 1``).
        init_tolerance: Relative distance of the initial loss from ``ln C`` that is flagged (``> 0``).
        check_init: Probe activations and gradients at initialization.

    Attributes:
        findings: :class:`Finding` records of the last diagnosis.

    Raises:
        ValueError: On invalid arguments.

    Example::

        from lightning_tricks.callbacks.diagnostics import TrainingDiagnostics

        diagnostics = TrainingDiagnostics()
        Trainer(callbacks=[diagnostics]).fit(model, datamodule=dm)
        print([f.check for f in diagnostics.findings])
    """

    def __init__(
        self,
        train_metric: str = "train/loss",
        val_metric: str = "val/loss",
        explosion_factor: float = 3.0,
        min_decrease: float = 0.05,
        overfit_patience: int = 2,
        underfit_fraction: float = 0.5,
        variance_factor: float = 100.0,
        init_tolerance: float = 0.5,
        check_init: bool = True,
    ) -> None:
        if not explosion_factor > 1:
            raise ValueError(f"`explosion_factor` must be > 1, got {explosion_factor!r}; the lectures use 3")
        if not 0 < min_decrease < 1:
            raise ValueError(f"`min_decrease` must be in (0, 1), got {min_decrease!r}")
        if not isinstance(overfit_patience, int) or overfit_patience < 1:
            raise ValueError(f"`overfit_patience` must be an int >= 1, got {overfit_patience!r}")
        if not 0 < underfit_fraction < 1:
            raise ValueError(f"`underfit_fraction` must be in (0, 1), got {underfit_fraction!r}")
        if not variance_factor > 1:
            raise ValueError(f"`variance_factor` must be > 1, got {variance_factor!r}")
        if not init_tolerance > 0:
            raise ValueError(f"`init_tolerance` must be > 0, got {init_tolerance!r}")
        self.train_metric, self.val_metric = train_metric, val_metric
        self.explosion_factor = float(explosion_factor)
        self.min_decrease = float(min_decrease)
        self.overfit_patience = overfit_patience
        self.underfit_fraction = float(underfit_fraction)
        self.variance_factor = float(variance_factor)
        self.init_tolerance = float(init_tolerance)
        self.check_init = check_init
        self.train_losses: list[float] = []
        self.eval_train_losses: list[float] = []
        self.val_losses: list[float] = []
        self.init: dict[str, Any] = {}
        self.findings: list[Finding] = []
        self._pending: list[Tensor] = []
        self._since_eval: list[Tensor] = []
        self._warned: set[str] = set()

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(train_metric=self.train_metric, val_metric=self.val_metric)

    # ----------------------------------------------------------------------------------- recording

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Probe the per-layer signal at initialization on one training batch."""
        if self.check_init and trainer.global_step == 0 and not self.init:
            with preserved_training_state(trainer, pl_module):
                self.init = self._probe(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Keep the step loss on its device; it is read back once per epoch."""
        # The `_step` variant and the returned loss are always this step's value; a bare metric name
        # may hold the previous epoch's aggregate when it is logged with on_epoch only.
        metrics = trainer.callback_metrics
        loss = metrics.get(f"{self.train_metric}_step")
        if loss is None:
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if not isinstance(loss, Tensor):
            loss = metrics.get(self.train_metric)
        if isinstance(loss, Tensor) and loss.numel() == 1:
            loss = loss.detach().reshape(())
            self._pending.append(loss)
            self._since_eval.append(loss)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Pair the validation loss with the training loss since the previous evaluation."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        val = trainer.callback_metrics.get(self.val_metric)
        if val is None or not self._since_eval:
            return
        self.eval_train_losses.append(float(torch.stack(self._since_eval).float().mean()))
        self.val_losses.append(float(val))
        self._since_eval = []

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read back the epoch's step losses and warn at once about NaN or explosion."""
        self._flush()
        for finding in (
            detect_nonfinite(self.train_losses),
            detect_explosion(self.train_losses, self.explosion_factor),
        ):
            if finding is not None and finding.check not in self._warned:
                self._warned.add(finding.check)
                rank_zero_warn(f"TrainingDiagnostics: {finding.message}. {finding.cause}; {finding.fix}.")

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Diagnose, print the summary table and log it."""
        self._flush()
        self.findings = self.diagnose()
        self._print_summary()
        self._log_summary(trainer)

    def _flush(self) -> None:
        if self._pending:
            self.train_losses.extend(torch.stack(self._pending).float().cpu().tolist())
            self._pending = []

    @torch.no_grad()
    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        batches = draw_batches(trainer, num_batches=1)
        pair = split_batch(batches[0]) if batches else None
        if pair is None:
            return {}
        x, y = pair
        order: list[str] = []
        act_var: dict[str, float] = {}
        grad_var: dict[str, float] = {}

        def make_hook(name: str) -> Any:
            def hook(module: nn.Module, args: Any, out: Any) -> None:
                if not isinstance(out, Tensor) or name in act_var:
                    return
                order.append(name)
                act_var[name] = float(out.detach().float().var())
                if out.requires_grad:
                    out.register_hook(grad_hook)

            def grad_hook(grad: Tensor) -> None:
                grad_var.setdefault(name, float(grad.float().var()))

            return hook

        handles = [
            m.register_forward_hook(make_hook(n))
            for n, m in pl_module.named_modules()
            if isinstance(m, _PROBED_LAYERS)
        ]
        result: dict[str, Any] = {}
        pl_module.train()
        try:
            with regularization_off(pl_module), torch.enable_grad():
                logits, reason = classifier_forward(trainer, pl_module, x, y)
                if reason is None:
                    loss = data_loss(pl_module, logits, y)
                    result["initial_loss"] = float(loss.detach())
                    result["num_classes"] = int(logits.shape[1])
                    if loss.requires_grad:
                        loss.backward()
        finally:
            for handle in handles:
                handle.remove()
        # The output layer is left out: a deliberately small last layer is not a signal problem.
        hidden = order[:-1] if len(order) > 2 else order
        result["layers"] = hidden
        result["activation_var"] = [act_var[n] for n in hidden]
        grad_layers = [n for n in reversed(hidden) if n in grad_var]
        result["gradient_layers"] = grad_layers
        result["gradient_var"] = [grad_var[n] for n in grad_layers]
        return result

    # ----------------------------------------------------------------------------------- diagnosis

    def diagnose(self) -> list[Finding]:
        """Run every detector over the recorded curves and initialization probe."""
        found: list[Finding | None] = [
            detect_nonfinite(self.train_losses),
            detect_nonfinite(self.val_losses, name="validation loss"),
            detect_explosion(self.train_losses, self.explosion_factor),
            detect_flat(self.train_losses, self.min_decrease),
            detect_overfitting(self.eval_train_losses, self.val_losses, self.overfit_patience),
        ]
        reference = self.init.get("initial_loss")
        if reference is None and "num_classes" in self.init:
            reference = math.log(self.init["num_classes"])
        if reference is None and self.train_losses:
            reference = self.train_losses[0]
        if reference is not None and self.val_losses:
            found.append(
                detect_underfitting(
                    self.eval_train_losses[-1], self.val_losses[-1], reference, self.underfit_fraction
                )
            )
        if "initial_loss" in self.init:
            found.append(
                detect_init_loss(self.init["initial_loss"], self.init["num_classes"], self.init_tolerance)
            )
        if self.init.get("layers"):
            found.append(
                detect_variance_drift(
                    self.init["activation_var"], self.init["layers"], self.variance_factor, "activation"
                )
            )
            found.append(
                detect_variance_drift(
                    self.init["gradient_var"], self.init["gradient_layers"], self.variance_factor, "gradient"
                )
            )
        return [f for f in found if f is not None]

    def _rows(self) -> list[list[str]]:
        return [[f.severity, f.check, f.message, f.cause, f.fix] for f in self.findings]

    @rank_zero_only
    def _print_summary(self) -> None:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="Training diagnostics", show_lines=True)
        table.add_column("severity", no_wrap=True)
        table.add_column("check", no_wrap=True)
        for column in ("what was seen", "likely cause", "fix"):
            table.add_column(column, overflow="fold")
        for row in self._rows():
            table.add_row(*row)
        if not self.findings:
            final = f"{self.train_losses[-1]:.4g}" if self.train_losses else "n/a"
            table.add_row("ok", "all", f"no problems found (final training loss {final})", "", "")
        Console().print(table)

    @rank_zero_only
    def _log_summary(self, trainer: pl.Trainer) -> None:
        columns = ["severity", "check", "message", "cause", "fix"]
        rows = self._rows() or [["ok", "all", "no problems found", "", ""]]
        for logger in trainer.loggers:
            if callable(getattr(logger, "log_table", None)):
                logger.log_table(key="diagnostics/findings", columns=columns, data=rows)
            elif callable(getattr(getattr(logger, "experiment", None), "add_text", None)):
                text = "\n".join(["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"])
                text += "".join("\n| " + " | ".join(r) + " |" for r in rows)
                logger.experiment.add_text("diagnostics/findings", text, trainer.global_step)

    # ----------------------------------------------------------------------------------- state

    @override
    def state_dict(self) -> dict[str, Any]:
        self._flush()
        return {
            "train_losses": list(self.train_losses),
            "eval_train_losses": list(self.eval_train_losses),
            "val_losses": list(self.val_losses),
            "init": dict(self.init),
            "findings": [asdict(f) for f in self.findings],
            "warned": sorted(self._warned),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_losses = list(state_dict.get("train_losses", []))
        self.eval_train_losses = list(state_dict.get("eval_train_losses", []))
        self.val_losses = list(state_dict.get("val_losses", []))
        self.init = dict(state_dict.get("init", {}))
        self.findings = [Finding(**f) for f in state_dict.get("findings", [])]
        self._warned = set(state_dict.get("warned", []))
