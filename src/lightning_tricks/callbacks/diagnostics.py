"""TrainingDiagnostics: record the learning curves and the signal at initialization, run the
detectors of :mod:`lightning_tricks.callbacks.detectors` and say what is wrong in plain words.

Example::

    from lightning_tricks.callbacks.diagnostics import TrainingDiagnostics

    trainer = Trainer(callbacks=[TrainingDiagnostics()])
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_tricks.callbacks._explosion import check_divergence_factor
from lightning_tricks.callbacks._init_probe import probe_initialization
from lightning_tricks.callbacks._monitor import missing_metric_message, returned_loss
from lightning_tricks.callbacks._training_state import preserved_training_state
from lightning_tricks.callbacks.detectors import (
    Finding,
    detect_explosion,
    detect_flat,
    detect_init_loss,
    detect_nonfinite,
    detect_overfitting,
    detect_underfitting,
    detect_variance_drift,
)

_VAL_WORDS = frozenset({"val", "valid", "validation"})
_MIN_FLAT_POINTS = 4  # detect_flat judges curves of at least this many points


def find_validation_loss(metrics: Any) -> str | None:
    """The one logged name that reads as a validation loss (``val/loss``, ``val_loss``, ``valid_loss``,
    ...), or ``None`` when there is none or more than one. Suffixed twins that other callbacks log
    (``val_loss_ema``, ``val/loss_ensemble``) do not count beside the name they extend.

    Example::

        >>> find_validation_loss({"val_loss": 0.3, "val_acc": 0.9, "train_loss": 0.2, "val_loss_ema": 0.2})
        'val_loss'
    """
    names = [
        n
        for n in metrics
        if (words := set(re.split(r"[^a-z0-9]+", n.lower()))) & _VAL_WORDS
        and "loss" in words
        and not n.endswith(("_step", "_epoch"))
    ]
    names = [n for n in names if not any(n.startswith(f"{other}_") for other in names)]
    return names[0] if len(names) == 1 else None


class TrainingDiagnostics(Callback):
    """Watch the loss curves and the signal at initialization; explain what looks wrong.

    Records the training loss at every step (the loss ``training_step`` returns, or ``train_metric``),
    the training loss averaged since the last evaluation and the validation loss at every evaluation,
    and at the start of a fresh fit the per-layer variance of Linear/Conv outputs and of their
    gradients on one training batch (with regularization off; all state restored bit for bit, RNG
    isolated). At the end of ``fit`` it runs the detectors of
    :mod:`~lightning_tricks.callbacks.detectors`, prints a table on rank 0, sends it to the logger
    (``log_table`` as on ``WandbLogger``, or TensorBoard text) and keeps the problems in
    :attr:`findings`. A check without data to judge (no validation loss found, too few evaluations, a
    probe that could not run) is never reported as passed: it is listed as "not checked" with the
    reason (:attr:`unchecked`), and a metric that cannot be found is warned about once, on rank 0,
    naming the argument to set. NaN and explosions are also warned about at the end of the epoch they
    happen in. Curves and findings are checkpointed, so a resumed run keeps its history.

    Args:
        train_metric: Logged training loss (its ``_step`` variant when logged with ``on_step=True,
            on_epoch=True``); ``None`` (default): the loss ``training_step`` returns.
        val_metric: Logged validation loss; ``None`` (default): the one logged name that reads as a
            validation loss (``val/loss``, ``val_loss``, ``valid_loss``, ...).
        divergence_factor: Loss above this multiple of the first loss is an explosion (``> 1``); the
            rule :class:`SmoothedEarlyStopping` and :class:`LRFinder` apply too.
        min_decrease: Relative decrease below which the training loss is flat (``(0, 1)``).
        overfit_patience: Evaluations of rising validation loss that count as overfitting (``>= 1``).
        underfit_fraction: Final losses above this fraction of the initial loss count as underfitting
            when train and val are close (``(0, 1)``).
        variance_factor: First-to-last-layer variance ratio that flags a bad initialization (``> 1``).
        init_tolerance: Relative distance of the initial loss from ``ln C`` (or the module's
            ``expected_initial_loss()``, e.g. ``(C-1)/C`` for the hinge loss) that is flagged (``> 0``).
        check_init: Probe activations and gradients at initialization.

    Attributes:
        findings: :class:`Finding` records of the problems found by the last diagnosis.
        unchecked: :class:`Finding` records (severity ``"not checked"``) of the checks that had no data.

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
        train_metric: str | None = None,
        val_metric: str | None = None,
        divergence_factor: float = 3.0,
        min_decrease: float = 0.05,
        overfit_patience: int = 2,
        underfit_fraction: float = 0.5,
        variance_factor: float = 100.0,
        init_tolerance: float = 0.5,
        check_init: bool = True,
    ) -> None:
        check_divergence_factor(divergence_factor, type(self).__name__)
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
        self.divergence_factor = float(divergence_factor)
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
        self.unchecked: list[Finding] = []
        self._pending: list[Tensor] = []
        self._since_eval: list[Tensor] = []
        self._warned: set[str] = set()
        self._missing: dict[str, str] = {}  # argument -> why its metric was not found

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
                self.init = probe_initialization(trainer, pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Keep the step loss on its device; it is read back once per epoch."""
        loss = self._step_loss(trainer, outputs)
        if loss is not None:
            self._pending.append(loss)
            self._since_eval.append(loss)

    def _step_loss(self, trainer: pl.Trainer, outputs: Any) -> Tensor | None:
        if self.train_metric is None:
            loss = returned_loss(outputs)
            if loss is None:
                self._warn_missing(
                    "train_metric", "training_step returns no loss (manual optimization?)", trainer
                )
            return loss
        # The `_step` variant is always this step's value; a bare metric name may hold the previous
        # epoch's aggregate when it is logged with on_epoch only.
        metrics = trainer.callback_metrics
        loss = metrics.get(f"{self.train_metric}_step", metrics.get(self.train_metric))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            message = missing_metric_message(type(self).__name__, "train_metric", self.train_metric, metrics)
            self._warn_missing("train_metric", message, trainer)
            return None
        return loss.detach().reshape(())

    def _warn_missing(self, argument: str, why: str, trainer: pl.Trainer) -> None:
        self._missing[argument] = why
        if argument not in self._warned:
            self._warned.add(argument)
            rank_zero_warn(
                f"TrainingDiagnostics: {why}; the checks that need it are skipped. Set `{argument}` to the"
                " name of the logged loss."
            )

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Pair the validation loss with the training loss since the previous evaluation."""
        if trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        metrics = trainer.callback_metrics
        name = self.val_metric or find_validation_loss(metrics)
        val = metrics.get(name) if name is not None else None
        if val is None:
            if self.val_metric is None:
                why = f"found no logged validation loss among `{'`, `'.join(metrics)}`"
            else:
                why = missing_metric_message(type(self).__name__, "val_metric", self.val_metric, metrics)
            self._warn_missing("val_metric", why, trainer)
            return
        if not self._since_eval:
            return
        # `.to`: the losses restored from a mid-epoch checkpoint are on the CPU (a no-op for the others)
        since_eval = torch.stack([loss.to(pl_module.device) for loss in self._since_eval])
        self.eval_train_losses.append(float(since_eval.float().mean()))
        self.val_losses.append(float(val))
        self._since_eval = []

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read back the epoch's step losses and warn at once about NaN or explosion."""
        self._flush()
        for finding in (
            detect_nonfinite(self.train_losses),
            detect_explosion(self.train_losses, self.divergence_factor),
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

    # ----------------------------------------------------------------------------------- diagnosis

    def diagnose(self) -> list[Finding]:
        """Run every detector that has data; return the problems, list the others in :attr:`unchecked`."""
        self.unchecked = []
        train, val, evals = self.train_losses, self.val_losses, len(self.val_losses)
        found: list[Finding | None] = []
        if self._enough("training curve", len(train), 1, "training losses", "train_metric"):
            found.append(detect_nonfinite(train))
            if self._enough("explosion", len(train), 2, "training losses", "train_metric"):
                found.append(detect_explosion(train, self.divergence_factor))
            if self._enough("flat", len(train), _MIN_FLAT_POINTS, "training losses", "train_metric"):
                found.append(detect_flat(train, self.min_decrease))
        if self._enough("validation curve", evals, 1, "validation losses", "val_metric"):
            found.append(detect_nonfinite(val, name="validation loss"))
            if self._enough("overfitting", evals, self.overfit_patience + 1, "evaluations", "val_metric"):
                found.append(detect_overfitting(self.eval_train_losses, val, self.overfit_patience))
            reference = self.init.get("initial_loss")
            if reference is None and "num_classes" in self.init:
                reference = math.log(self.init["num_classes"])
            if reference is None and train:
                reference = train[0]
            if reference is not None:
                found.append(
                    detect_underfitting(
                        self.eval_train_losses[-1], val[-1], reference, self.underfit_fraction
                    )
                )
        if self.check_init:
            found += self._init_findings()
        return [f for f in found if f is not None]

    def _enough(self, check: str, have: int, need: int, what: str, argument: str) -> bool:
        if have >= need:
            return True
        if have == 0:
            why = self._missing.get(argument, f"no {what} were recorded")
            fix = f"set `{argument}` to the name of the logged loss"
        else:
            why = f"only {have} {what}, {need} needed"
            fix = "train for more steps or evaluate more often"
        self.unchecked.append(Finding(check, "not checked", f"no data to judge: {why}", "", fix))
        return False

    def _init_findings(self) -> list[Finding | None]:
        if "initial_loss" not in self.init:
            self.unchecked.append(
                Finding(
                    "init_loss",
                    "not checked",
                    "no data to judge: the initialization probe found no (inputs, targets) batch or no"
                    " classifier logits",
                    "",
                    "pass batches as (inputs, targets) with a forward that returns logits",
                )
            )
            return []
        expected = self.init.get("expected_loss")
        found = [
            detect_init_loss(
                self.init["initial_loss"],
                self.init["num_classes"],
                self.init_tolerance,
                tuple(expected) if expected else None,
            )
        ]
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
        return found

    def _rows(self) -> list[list[str]]:
        rows = [[f.severity, f.check, f.message, f.cause, f.fix] for f in self.findings + self.unchecked]
        if not self.findings:
            ok = "no problems found" if not self.unchecked else "no problems found by the checks that ran"
            rows.insert(0, ["ok", "all", ok, "", ""])
        return rows

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
        Console().print(table)

    @rank_zero_only
    def _log_summary(self, trainer: pl.Trainer) -> None:
        columns = ["severity", "check", "message", "cause", "fix"]
        rows = self._rows()
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
            # the step losses since the last evaluation: a mid-epoch checkpoint is taken between the two
            "since_eval": torch.stack(self._since_eval).float().cpu().tolist() if self._since_eval else [],
            "val_losses": list(self.val_losses),
            "init": dict(self.init),
            "findings": [asdict(f) for f in self.findings],
            "unchecked": [asdict(f) for f in self.unchecked],
            "warned": sorted(self._warned),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.train_losses = list(state_dict.get("train_losses", []))
        self.eval_train_losses = list(state_dict.get("eval_train_losses", []))
        self._since_eval = [torch.tensor(loss) for loss in state_dict.get("since_eval", [])]
        self.val_losses = list(state_dict.get("val_losses", []))
        self.init = dict(state_dict.get("init", {}))
        self.findings = [Finding(**f) for f in state_dict.get("findings", [])]
        self.unchecked = [Finding(**f) for f in state_dict.get("unchecked", [])]
        self._warned = set(state_dict.get("warned", []))
