"""What the ``lightning-tricks`` command prints: progress, the model summary, and no third-party noise.

- :func:`silence_third_party_noise` drops messages that are not the user's concern (Lightning's
  LitLogger/litmodels tips, a torch deprecation raised inside Lightning's own code).
- :class:`PlainProgressBar` prints one plain line every ``every_n_seconds`` and one per epoch, for
  output to a file or a pipe, where a live bar shows nothing until the run ends.
- :class:`QuietRichProgressBar` is Lightning's rich bar without the logger's version number (``v_num``).
- :class:`QuietModelSummary` is Lightning's rich model summary without FLOPs when none were counted.

Example::

    import lightning as L
    from lightning_tricks.console import PlainProgressBar, QuietModelSummary

    trainer = L.Trainer(callbacks=[PlainProgressBar(every_n_seconds=30), QuietModelSummary()])
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelSummary, ProgressBar, RichModelSummary, RichProgressBar
from lightning.pytorch.utilities.model_summary import get_formatted_model_size, get_human_readable_count

__all__ = [
    "PlainProgressBar",
    "QuietModelSummary",
    "QuietRichProgressBar",
    "console_callbacks",
    "silence_third_party_noise",
]


class _DropLightningTips(logging.Filter):
    """Lightning's advertising for its cloud products ("💡 Tip: ... litlogger / litmodels"), and its
    note that the command's own model summary replaces the default one."""

    PREFIXES = ("💡 Tip:", "Trainer already configured with model summary callbacks")

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIXES)


_TIPS_FILTER = _DropLightningTips()


def silence_third_party_noise() -> None:
    """Silence, narrowly, what Lightning and torch print that a user can neither act on nor needs.

    Idempotent; call it before building the Trainer.
    """
    # The tips are `rank_zero_info` records of this logger (lightning 2.6, logger_connector.py and
    # callback_connector.py); a logger's filters apply to the records it creates itself.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_TIPS_FILTER)
    # torch 2.10+ deprecates `LeafSpec`, which Lightning 2.6's own _pytree.py still instantiates.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def _without_version(metrics: dict[str, Any]) -> dict[str, Any]:
    # `v_num` is the logger's run version, not a metric; the run folder is in the end-of-fit summary.
    metrics.pop("v_num", None)
    return metrics


class QuietRichProgressBar(RichProgressBar):
    """Lightning's :class:`~lightning.pytorch.callbacks.RichProgressBar` without ``v_num``."""

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return _without_version(super().get_metrics(trainer, pl_module))


class PlainProgressBar(ProgressBar):
    """Progress as plain lines: every ``every_n_seconds`` during training, and at the end of each epoch.

    A live bar (rich or tqdm) redraws one line in place, which a file or pipe cannot show; this
    prints complete lines, e.g. ``epoch 2/8  step 60/160  train/loss 0.412  5.3 batches/s``.
    Hand-written because neither of Lightning's bars prints periodic lines.

    Args:
        every_n_seconds: minimum time between two in-epoch lines, ``>= 0`` (``0``: every batch).
    """

    def __init__(self, every_n_seconds: float = 30.0) -> None:
        super().__init__()
        if not (isinstance(every_n_seconds, (int, float)) and every_n_seconds >= 0):
            raise ValueError(f"`every_n_seconds` must be a number >= 0, got {every_n_seconds!r}.")
        self.every_n_seconds = float(every_n_seconds)
        self._enabled = True
        self._epoch_start = 0.0
        self._last_line = 0.0

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._enabled:
            print(*args, **kwargs, flush=True)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        return _without_version(super().get_metrics(trainer, pl_module))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch_start = self._last_line = time.monotonic()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = time.monotonic()
        if now - self._last_line < self.every_n_seconds:
            return
        self._last_line = now
        total = self.total_train_batches
        step = f"step {batch_idx + 1}/{total}" if total != float("inf") else f"step {batch_idx + 1}"
        rate = (batch_idx + 1) / max(now - self._epoch_start, 1e-9)
        self.print(self._line(trainer, pl_module, step, f"{rate:.3g} batches/s"))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seconds = time.monotonic() - self._epoch_start
        self.print(self._line(trainer, pl_module, "done", f"{seconds:.1f} s"))

    def _line(self, trainer: pl.Trainer, pl_module: pl.LightningModule, where: str, pace: str) -> str:
        epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else "?"
        metrics = "  ".join(
            f"{name} {_format(value)}" for name, value in self.get_metrics(trainer, pl_module).items()
        )
        return "  ".join(
            part for part in (f"epoch {trainer.current_epoch + 1}/{epochs}", where, metrics, pace) if part
        )


def _format(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


class QuietModelSummary(RichModelSummary):
    """Lightning's rich model summary, without the FLOPs column and total when no FLOPs were counted.

    Lightning counts FLOPs only for modules with an ``example_input_array`` and otherwise prints
    ``0`` for every layer and the total, which reads as a measurement.
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        from rich import get_console
        from rich.table import Table

        columns = [(name, values) for name, values in summary_data if total_flops or name != "FLOPs"]
        table = Table(header_style=summarize_kwargs.get("header_style", "bold magenta"))
        for index, (name, _) in enumerate(columns):
            table.add_column(" " if index == 0 else name, style="dim" if index == 0 else None)
        for row in zip(*(values for _, values in columns), strict=True):
            table.add_row(*row)
        console = get_console()
        console.print(table)
        totals = {
            "Trainable params": get_human_readable_count(int(trainable_parameters)),
            "Non-trainable params": get_human_readable_count(int(total_parameters - trainable_parameters)),
            "Total params": get_human_readable_count(int(total_parameters)),
            "Total estimated model params size (MB)": get_formatted_model_size(model_size),
            "Modules in train mode": total_training_modes["train"],
            "Modules in eval mode": total_training_modes["eval"],
        }
        if total_flops:
            totals["Total FLOPs"] = get_human_readable_count(total_flops)
        for name, value in totals.items():
            console.print(f"[bold]{name}[/]: {value}")


def console_callbacks(
    configured: list[pl.Callback], enable_progress_bar: bool | None, enable_model_summary: bool | None
) -> list[pl.Callback]:
    """The command's progress bar and model summary, unless the trainer's config turns them off or
    already chooses its own: a rich bar on a terminal, plain lines when output goes to a file."""
    added: list[pl.Callback] = []
    if enable_progress_bar is not False and not any(isinstance(c, ProgressBar) for c in configured):
        added.append(QuietRichProgressBar() if sys.stdout.isatty() else PlainProgressBar())
    if enable_model_summary is not False and not any(isinstance(c, ModelSummary) for c in configured):
        added.append(QuietModelSummary())
    return added
