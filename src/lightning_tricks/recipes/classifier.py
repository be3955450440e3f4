"""The image-classification recipe: a LightningModule whose every trick is selectable from YAML.

Metric names (stable, read by callbacks and dashboards):

- ``train/loss`` (the optimised objective: data loss + penalty), ``train/acc``; with SAM, the loss at the
  unperturbed weights; ``train/jsd`` (the AugMix Jensen-Shannon term) with ``regularization.jsd_lambda``
- ``val/loss``, ``val/acc``, ``val/acc_top5``
- ``test/loss``, ``test/acc``, ``test/acc_top5``, and with test-time augmentation ``test/acc_tta_<mode>``
  for each mode plus ``test/acc_tta`` (the first mode's, the one ``predict`` returns)

Example::

    import lightning as L
    from lightning_tricks.datamodules import DigitsDataModule
    from lightning_tricks.recipes import ImageClassifier, OptimizerConfig, SchedulerConfig

    dm = DigitsDataModule(image_size=32)
    model = ImageClassifier(
        "resnet20",
        num_classes=dm.num_classes,
        in_channels=dm.in_channels,
        optimizer=OptimizerConfig(name="sgd", lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4),
        scheduler=SchedulerConfig(name="cosine", interval="step", warmup=50),
    )
    L.Trainer(max_epochs=5).fit(model, dm)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from typing import Any, ClassVar

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_tricks import adapters
from lightning_tricks._lightning_compat import writes_step_logs
from lightning_tricks.callbacks._lr_scaling import scale_learning_rates
from lightning_tricks.interface import CONFIGURED_HPARAMS_KEY, attached_trainer, cross_entropy_initial_loss
from lightning_tricks.recipes import tta as tta_lib
from lightning_tricks.recipes._combinations import check_fit_combinations
from lightning_tricks.recipes._validation import check_training_steps, warn_batch_larger_than_data
from lightning_tricks.recipes.clipping import GradientClippingConfig, clip_adaptively
from lightning_tricks.recipes.consistency import jensen_shannon, split_views
from lightning_tricks.recipes.init import InitConfig, initialize
from lightning_tricks.recipes.models import create_model, get_classifier
from lightning_tricks.recipes.models.layers import dropout_disabled
from lightning_tricks.recipes.nonfinite import NonFiniteLossGuard
from lightning_tricks.recipes.optim import OptimizerConfig, build_optimizer, build_param_groups, scaled_lr
from lightning_tricks.recipes.optim_wrappers import find_wrapper
from lightning_tricks.recipes.regularization import RegularizationConfig, classification_loss, penalty
from lightning_tricks.recipes.running_metrics import RunningMean
from lightning_tricks.recipes.sam import SAM
from lightning_tricks.recipes.schedules import (
    SchedulerConfig,
    build_scheduler,
    check_resumed_length,
    schedule_length,
)

#: Modes of ``torch.compile`` accepted by ``ImageClassifier(compile=...)``.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Param-group key holding the global batch size the group's lr is scaled for (linear scaling rule).
LR_BATCH_KEY = "lr_global_batch_size"
# Checkpoint entry: the run length (in scheduler intervals) the LR schedule was fitted to.
SCHEDULE_LENGTH_KEY = "lightning_tricks_schedule_length"

#: Data losses of ``ImageClassifier(loss=...)``: cross-entropy, or the multi-class hinge (SVM) loss.
LOSSES = ("cross_entropy", "multi_margin")


def _as_config(value: Any, config_type: type) -> Any:
    """Accept a config dataclass, a plain dict (hparams from a checkpoint) or None (defaults)."""
    if value is None:
        return config_type()
    if isinstance(value, config_type):
        return value
    if isinstance(value, dict):
        return config_type(**value)
    raise TypeError(f"expected {config_type.__name__}, a dict or None, got {type(value).__name__}")


# Init args built into a config dataclass (stored in the hyper-parameters as its fields).
_CONFIG_TYPES: dict[str, type] = {
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "regularization": RegularizationConfig,
    "init": InitConfig,
    "gradient_clipping": GradientClippingConfig,
}


class ImageClassifier(L.LightningModule):
    """Cross-entropy (or multi-class hinge) image classifier over a backbone from the model zoo.

    Args:
        model: Registered model name (see :func:`lightning_tricks.recipes.models.list_models`), or
            ``timm/<name>`` for a timm architecture (timm installed; random weights, see ``pretrained``).
        num_classes: Number of classes (linked from the DataModule by the CLI).
        in_channels: Image channels (linked from the DataModule by the CLI).
        model_kwargs: Extra arguments of the model factory (``norm``, ``depth``, ``weights_path``...).
        optimizer: Optimizer name and hyper-parameters, no-decay groups, linear LR scaling.
        scheduler: LR schedule, its interval, and a linear warm-up that composes with it.
        regularization: L1/L2 penalties, label smoothing (two conventions), dropout, DropConnect.
        init: Weight initialisation scheme applied to the freshly built model.
        tta: Test-time augmentation for test/predict: one mode or a list of
            :data:`~lightning_tricks.recipes.tta.TTA_MODES` (``hflip``, ``ten_crop``, ``multi_scale``,
            ``flip_translate``, ``dense``, ``multi_scale_ten_crop``, ``color_pca``); each logged as
            ``test/acc_tta_<mode>`` beside the plain ``test/acc``, the first also as ``test/acc_tta``.
            ``dense`` needs a network with global average pooling (checked here); ``color_pca``
            reads the colour PCA of the DataModule's training statistics (``datamodule.stats``).
        tta_kwargs: Per-mode options, e.g. ``{"multi_scale_ten_crop": {"crop_size": 224, "scales":
            [224, 256, 384, 480, 640]}, "color_pca": {"alpha": 0.1}}`` (see
            :data:`~lightning_tricks.recipes.tta.TTA_OPTIONS`).
        on_nonfinite_loss: On a NaN/inf training loss, ``"stop"`` the run with a message naming the
            step, the loss, the last finite loss and the likely cause (default; read back without a
            per-step device sync at the logging steps, epoch ends and before every checkpoint, so no
            checkpoint holds weights that saw it, see :mod:`lightning_tricks.recipes.nonfinite`), or
            ``"skip"`` that step with a warning (checked every step, before ``backward``).
        channels_last: Keep the network's weights and its input batches in the ``channels_last``
            memory format (faster convolutions on tensor-core GPUs; results are unchanged).
        compile: ``torch.compile`` the network with this mode (``"default"``, ``"reduce-overhead"``,
            ``"max-autotune"``, ``"max-autotune-no-cudagraphs"``), or ``None`` (off). Compiling happens
            on the first batch of each new input shape and costs seconds to minutes (see README);
            the checkpoint layout is unchanged.
        loss: ``"cross_entropy"`` (default) or ``"multi_margin"``, the multi-class hinge (SVM) loss
            ``sum_{j != y} max(0, 1 - x_y + x_j) / C`` (``torch.nn.MultiMarginLoss``); it needs class-index
            targets, so label smoothing and mixup/cutmix are refused with it, and so are the initial-loss
            checks of InitLossCheck and TrainingDiagnostics (their ln(C) is cross-entropy's).
        gradient_clipping: Adaptive gradient clipping, ``{mode: agc, clip_factor: 0.01}``
            (:class:`~lightning_tricks.recipes.clipping.GradientClippingConfig`), applied in
            :meth:`configure_gradient_clipping`; clipping by norm or value is ``trainer.gradient_clip_val``.
        pretrained: Local weights file loaded into the network after initialisation (a ``state_dict`` or a
            checkpoint of this recipe; ``torch.load(weights_only=True)``, never a download). A classifier of
            another size is re-initialised with a warning; other mismatched keys are an error naming them
            (:func:`~lightning_tricks.recipes.pretrained.load_pretrained`).

    A network with an ``init_whitening(images)`` method (the ``airbench`` model) gets it called on
    the first training batch of a fresh run (rank 0's batch, broadcast to all ranks), so its
    patch-whitening layer comes from the training data as the DataModule delivers it.
    """

    #: Init args that define the network and what its weights mean: ``--ckpt_path`` refuses other values.
    architecture_hparams: ClassVar[tuple[str, ...]] = ("model", "num_classes", "in_channels", "model_kwargs")
    #: Init args a run from a checkpoint takes from the command line: how the network is evaluated and
    #: run, and where its initial weights come from (the checkpoint's then replace them). The others
    #: only matter for training and keep the checkpoint's values (:mod:`lightning_tricks._cli_checkpoint`).
    runtime_hparams: ClassVar[tuple[str, ...]] = (
        "tta",
        "tta_kwargs",
        "channels_last",
        "compile",
        "pretrained",
        "init",
    )

    def __init__(
        self,
        model: str = "small_cnn",
        num_classes: int = 10,
        in_channels: int = 3,
        model_kwargs: dict[str, Any] | None = None,
        optimizer: OptimizerConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        regularization: RegularizationConfig | None = None,
        init: InitConfig | None = None,
        tta: str | list[str] | None = None,
        tta_kwargs: dict[str, dict[str, Any]] | None = None,
        on_nonfinite_loss: str = "stop",
        channels_last: bool = False,
        compile: str | None = None,
        loss: str = "cross_entropy",
        gradient_clipping: GradientClippingConfig | None = None,
        pretrained: str | None = None,
    ) -> None:
        super().__init__()
        if compile is not None and compile not in COMPILE_MODES:
            raise ValueError(
                f"compile must be None (off) or one of {', '.join(COMPILE_MODES)}, got {compile!r}"
            )
        self.channels_last = channels_last
        self.nonfinite_guard = NonFiniteLossGuard(on_nonfinite_loss)
        self.optimizer_config: OptimizerConfig = _as_config(optimizer, OptimizerConfig)
        self.scheduler_config: SchedulerConfig = _as_config(scheduler, SchedulerConfig)
        self.regularization_config: RegularizationConfig = _as_config(regularization, RegularizationConfig)
        self.init_config: InitConfig = _as_config(init, InitConfig)
        if loss not in LOSSES:
            raise ValueError(f"loss={loss!r} is unknown; valid: {', '.join(LOSSES)}")
        if loss != "cross_entropy" and self.regularization_config.label_smoothing:
            raise ValueError(
                f"loss={loss!r} needs class-index targets, but regularization.label_smoothing="
                f"{self.regularization_config.label_smoothing} makes soft ones; set "
                "regularization.label_smoothing=0 or loss=cross_entropy"
            )
        self.loss = loss
        self.gradient_clipping: GradientClippingConfig | None = (
            None if gradient_clipping is None else _as_config(gradient_clipping, GradientClippingConfig)
        )
        self.tta = tta_lib.check_tta(tta, tta_kwargs)
        self.tta_kwargs = {mode: dict(options) for mode, options in (tta_kwargs or {}).items()}
        # Under LightningCLI this records the config with its class path, so `test --ckpt_path`
        # can rebuild the module; the configs are then stored as plain dicts, not dataclasses,
        # so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters()
        self.hparams.update(
            optimizer=asdict(self.optimizer_config),
            scheduler=asdict(self.scheduler_config),
            regularization=asdict(self.regularization_config),
            init=asdict(self.init_config),
            gradient_clipping=None if self.gradient_clipping is None else asdict(self.gradient_clipping),
        )
        self._configured_hparams = copy.deepcopy(dict(self.hparams))
        self.num_classes = num_classes
        self.net = create_model(
            model, num_classes=num_classes, in_channels=in_channels, **self._model_kwargs(model_kwargs)
        )
        initialize(self.net, self.init_config)
        if pretrained is not None:
            from lightning_tricks.recipes.pretrained import load_pretrained

            load_pretrained(self.net, pretrained, key="model.init_args.pretrained")
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile is not None:
            self.net.compile(mode=compile)  # in place: parameter names and state_dict keys unchanged
        self._whitening_pending = hasattr(self.net, "init_whitening") and getattr(self.net, "whitening", True)
        self._regularization_scale = 1.0
        top_k = min(5, num_classes)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_acc", MulticlassAccuracy(num_classes, average="micro"))
            setattr(self, f"{stage}_acc_top5", MulticlassAccuracy(num_classes, top_k=top_k, average="micro"))
        if "dense" in self.tta:
            tta_lib.global_average_pool(self.net)  # refuses a network without one, naming tta
        for mode in self.tta:
            setattr(self, f"test_acc_tta_{mode}", MulticlassAccuracy(num_classes, average="micro"))
        # The epoch's running training loss and accuracy are updated every step with two in-place
        # additions each (RunningMean), and live in the module's state_dict, so a run resumed mid-epoch
        # reports the same epoch values (Lightning does not checkpoint its own running epoch aggregates).
        self.train_loss = RunningMean()
        self.train_acc = RunningMean()
        for metric in (self.train_loss, self.train_acc):
            metric.persistent(True)
        # Not persistent: its sums were never in checkpoints, which keep their keys.
        self.train_penalty = RunningMean()
        self.train_jsd = RunningMean()
        self._epoch_metrics_logged_in: int | None = None  # epoch whose aggregates are registered
        self._schedule_length: tuple[int, int] | None = None  # (length, steps per epoch) of this fit
        self._resumed_schedule_length: int | None = None  # the checkpoint's, when resuming

    @classmethod
    def saved_hparam(cls, name: str, value: Any) -> Any:
        """Init arg ``name`` as a checkpoint's ``hyper_parameters`` hold it: a config (dict or ``None``
        for its defaults) as its resolved fields, ``gradient_clipping: None`` (off) as ``None``.

        Example::

            ImageClassifier.saved_hparam("optimizer", {"name": "sgd"})["momentum"]  # 0.9
        """
        config_type = _CONFIG_TYPES.get(name)
        if config_type is None or (value is None and name == "gradient_clipping"):
            return value
        return asdict(_as_config(value, config_type))

    def _model_kwargs(self, model_kwargs: dict[str, Any] | None) -> dict[str, Any]:
        kwargs = dict(model_kwargs or {})
        for name in ("dropout", "drop_connect"):
            value = getattr(self.regularization_config, name)
            if value:
                if name in kwargs:
                    raise ValueError(
                        f"{name} is set both in regularization.{name} and model_kwargs.{name}; keep one"
                    )
                kwargs[name] = value
        return kwargs

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last and images.ndim == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    # -- backbone / head split (read by Lightning's BackboneFinetuning and BaseFinetuning) ------
    @property
    def head(self) -> nn.Module:
        """The network's final linear classifier (:func:`lightning_tricks.recipes.models.get_classifier`)."""
        return get_classifier(self.net)

    @property
    def backbone(self) -> nn.ModuleList:
        """Every layer of the network except :attr:`head`, as an unregistered ``ModuleList`` view.

        The view holds the layers that own parameters or have no children, which is what Lightning's
        finetuning callbacks freeze, unfreeze and put in a new param group; it is rebuilt on each access and
        never registered, so checkpoints keep one copy of every weight under ``net.``. Frozen parameters
        are left out of the optimizer that :meth:`configure_optimizers` builds.

        Example::

            from lightning.pytorch.callbacks import BackboneFinetuning

            trainer = L.Trainer(callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=5)])
            trainer.fit(ImageClassifier("resnet20"), datamodule)  # head only for 5 epochs, then all
        """
        head = self.head
        return nn.ModuleList(
            m
            for m in self.net.modules()
            if m is not head and (not list(m.children()) or list(m.parameters(recurse=False)))
        )

    # -- losses -------------------------------------------------------------------------------
    def expected_initial_loss(self) -> tuple[float, str]:
        """The data loss at near-zero initial logits and its formula, read by InitLossCheck and
        TrainingDiagnostics: ``ln(C)`` for cross-entropy (with or without label smoothing), ``(C-1)/C``
        for the multi-class hinge loss (every wrong class costs the margin 1, divided by ``C``).

        Example::

            ImageClassifier("linear", num_classes=10, loss="multi_margin").expected_initial_loss()
            # (0.9, '(C-1)/C = 9/10 = 0.9000 for the multi-class hinge loss')
        """
        c = self.num_classes
        if self.loss == "multi_margin":
            value = (c - 1) / c
            return value, f"(C-1)/C = {c - 1}/{c} = {value:.4f} for the multi-class hinge loss"
        return cross_entropy_initial_loss(c)

    def data_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy with the configured label smoothing (targets are class indices or soft), or the
        multi-class hinge loss (class indices only)."""
        if self.loss == "multi_margin":
            if targets.ndim != 1:
                raise ValueError(
                    f"loss='multi_margin' needs class-index targets, got soft targets of shape "
                    f"{tuple(targets.shape)} (mixup/cutmix?); use loss=cross_entropy with them"
                )
            return F.multi_margin_loss(logits, targets)
        cfg = self.regularization_config
        eps = cfg.label_smoothing * min(self._regularization_scale, 1.0)
        return classification_loss(
            logits, targets, label_smoothing=eps, convention=cfg.label_smoothing_convention
        )

    def augmix_loss(self, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """AugMix's objective on a ``[clean; view 1; view 2]`` batch: ``(CE(clean) + lambda * JS, JS)``.

        ``lambda`` is ``regularization.jsd_lambda``, scaled like the other regularisers.
        """
        clean, *views = split_views(logits)
        consistency = jensen_shannon(clean, *views)
        weight = self.regularization_config.jsd_lambda * self._regularization_scale
        return self.data_loss(clean, targets[: len(clean)]) + weight * consistency, consistency

    def penalty(self) -> torch.Tensor:
        """The L1/L2 (elastic-net) penalty on the weights, scaled by the regularisation factor."""
        cfg = self.regularization_config
        scale = self._regularization_scale
        return penalty(
            self.net, l1=cfg.l1 * scale, l2=cfg.l2 * scale, include_norm_and_bias=cfg.penalize_norm_and_bias
        )

    @contextmanager
    def regularization_scaled(self, factor: float) -> Iterator[None]:
        """Temporarily scale regularisation: 0 turns off penalties, label smoothing, dropout and
        DropConnect; factors above 1 multiply the penalty coefficients (the lectures' "crank up
        regularisation and the loss must go up" check)."""
        if factor < 0:
            raise ValueError(f"factor must be >= 0, got {factor}")
        saved_scale = self._regularization_scale
        self._regularization_scale = factor
        try:
            with dropout_disabled(self.net) if factor == 0 else nullcontext():
                yield
        finally:
            self._regularization_scale = saved_scale

    # -- steps --------------------------------------------------------------------------------
    @staticmethod
    def _hard_targets(targets: torch.Tensor) -> torch.Tensor:
        return targets.argmax(dim=1) if targets.ndim == 2 else targets

    def on_fit_start(self) -> None:
        """Check that the DataModule yields the AugMix views the Jensen-Shannon loss needs (and back)."""
        datamodule = self.trainer.datamodule
        views = getattr(datamodule, "augmix_jsd", None)
        lam = self.regularization_config.jsd_lambda
        if lam and views is False:
            raise ValueError(
                f"regularization.jsd_lambda={lam} needs a clean and two AugMix views of every training "
                "image, but data.init_args.augmix_jsd is false; set it true (with augmix as the last "
                "preset of data.init_args.augment), or regularization.jsd_lambda: 0"
            )
        if views and not lam:
            rank_zero_warn(
                "data.init_args.augmix_jsd=true yields three views per image but regularization.jsd_lambda "
                "is 0, so they are trained as plain extra samples; set jsd_lambda (12 in the AugMix paper)"
            )

    def on_train_epoch_start(self) -> None:
        """Keep the linear scaling rule on the current global batch (see :meth:`follow_global_batch`)
        and start the epoch's running training metrics empty."""
        self.follow_global_batch()
        self._set_network_epoch()
        # A new epoch's running metrics start empty, also after resuming from an epoch-end checkpoint
        # (saved before Lightning resets them); a mid-epoch resume skips this hook and keeps its sums.
        self.train_loss.reset()
        self.train_acc.reset()
        self.train_penalty.reset()
        self.train_jsd.reset()

    def on_train_start(self) -> None:
        """Refuse to resume a schedule fitted to a shorter run (see
        :func:`~lightning_tricks.recipes.schedules.check_resumed_length`): here, because both lengths
        are known whatever order the strategy restores in, and no step has run."""
        saved, current = self._resumed_schedule_length, self._schedule_length
        if saved is not None and current is not None and self.trainer.ckpt_path is not None:
            check_resumed_length(self.scheduler_config, saved, *current)
        self._epoch_metrics_logged_in = None  # a new fit registers its epoch aggregates again
        self._set_network_epoch()  # also a run resumed mid-epoch, which skips on_train_epoch_start

    def _set_network_epoch(self) -> None:
        """Tell a network with epoch-dependent training (airbench's whitening-bias freeze) the epoch."""
        set_epoch = getattr(self.net, "set_training_epoch", None)
        if set_epoch is not None:
            set_epoch(self.current_epoch)

    def on_train_epoch_end(self) -> None:
        self.nonfinite_guard.flush(self)

    def on_train_end(self) -> None:
        self.nonfinite_guard.flush(self)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse to write weights that a recorded non-finite loss has reached (see ``on_nonfinite_loss``);
        record the run length the LR schedule was fitted to and the hyper-parameters as configured."""
        self.nonfinite_guard.flush(self)
        checkpoint[CONFIGURED_HPARAMS_KEY] = copy.deepcopy(self._configured_hparams)
        if self._schedule_length is not None:
            checkpoint[SCHEDULE_LENGTH_KEY] = self._schedule_length[0]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Read the schedule's fitted run length, and the running training accuracy of checkpoints that
        stored it as torchmetrics' stat scores."""
        self._resumed_schedule_length = checkpoint.get(SCHEDULE_LENGTH_KEY)
        # A resumed run was built from the checkpoint's (possibly rewritten) hyper-parameters: keep
        # comparing with what the first run was configured with.
        self._configured_hparams = checkpoint.get(CONFIGURED_HPARAMS_KEY, self._configured_hparams)
        state = checkpoint.get("state_dict", {})
        if "train_acc.tp" in state:
            tp, fn = state["train_acc.tp"], state["train_acc.fn"]
            for key in ("tp", "fp", "tn", "fn"):
                state.pop(f"train_acc.{key}")
            state["train_acc.mean_value"] = tp.sum().float()
            state["train_acc.weight"] = (tp + fn).sum().float()

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Initialise a patch-whitening first layer from the first training batch of a fresh run."""
        if not self._whitening_pending:
            return
        self._whitening_pending = False  # checked once per process: no per-step device sync
        net = self.net
        if bool(getattr(net, "whitening_initialized", False)):
            return  # restored from a checkpoint
        images = adapters.inputs_of(batch, self)
        net.init_whitening(images)
        weight = net.whiten.weight if hasattr(net, "whiten") else None
        if weight is not None and self.trainer.world_size > 1:
            weight.data.copy_(self.trainer.strategy.broadcast(weight.data, src=0))
        rank_zero_info(f"Initialised the patch-whitening layer from {len(images)} training images")

    def _objective(
        self, logits: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """The optimised loss (data loss + penalty), the penalty alone and AugMix's Jensen-Shannon
        term (each ``None`` when off)."""
        cfg = self.regularization_config
        consistency = None
        if cfg.jsd_lambda:
            loss, consistency = self.augmix_loss(logits, targets)
        else:
            loss = self.data_loss(logits, targets)
        reg = self.penalty() if (cfg.l1 or cfg.l2) and self._regularization_scale else None
        return (loss if reg is None else loss + reg), reg, consistency

    def _sam_perturbed_pass(self) -> bool:
        """Whether SAM is evaluating the loss at its perturbed weights (its second closure call)."""
        trainer = attached_trainer(self)
        if self.optimizer_config.sam is None or trainer is None:
            return False
        return any(getattr(find_wrapper(opt, SAM), "perturbed", False) for opt in trainer.optimizers)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor | None:
        images, targets = batch
        perturbed = self._sam_perturbed_pass()
        # SAM's second pass: the step's BatchNorm statistics and metrics come from the first pass alone.
        with frozen_norm_statistics(self.net) if perturbed else nullcontext():
            logits = self(images)
        loss, reg, consistency = self._objective(logits, targets)
        trainer = attached_trainer(self)
        writes_logs = trainer is None or writes_step_logs(trainer)
        if not self.nonfinite_guard.check(self, loss, images, batch_idx, read_now=writes_logs):
            return None  # "skip": Lightning skips backward and the optimizer step
        if perturbed:
            return loss
        self._update_train_metrics(logits, targets, loss, reg, consistency)
        if trainer is not None:
            self._log_train_metrics(loss, reg, consistency, writes_logs)
        return loss

    def _update_train_metrics(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        loss: torch.Tensor,
        reg: torch.Tensor | None,
        consistency: torch.Tensor | None = None,
    ) -> None:
        """Accumulate the epoch's training metrics on the device (no host read, no per-step compute)."""
        batch = len(logits)
        correct = (logits.detach().argmax(dim=1) == self._hard_targets(targets)).sum()
        self.train_acc.update(correct, batch)
        self.train_loss.update(loss.detach() * batch, batch)  # batch-size weighted, as Lightning's mean
        if reg is not None:
            self.train_penalty.update(reg.detach() * batch, batch)
        if consistency is not None:
            self.train_jsd.update(consistency.detach() * batch, batch)

    def _log_train_metrics(
        self,
        loss: torch.Tensor,
        reg: torch.Tensor | None,
        consistency: torch.Tensor | None,
        writes_logs: bool,
    ) -> None:
        """Log ``train/loss``, ``train/acc`` (and ``train/penalty``, ``train/jsd``) with Lightning's
        names, cheaply.

        The epoch aggregates are torchmetrics objects registered with ``self.log`` once per epoch:
        Lightning computes them at the epoch end from every step's update. The step values are logged
        only on the steps Lightning writes (``Trainer(log_every_n_steps)``), as a host copy, so the other
        steps pay neither ``self.log`` nor a device read (Lightning converts progress-bar values to
        numbers after every step). Names are those of ``self.log(name, on_step=True, on_epoch=True)``:
        ``NAME_step`` and ``NAME_epoch`` in the loggers, plus ``NAME`` (the epoch value) in
        ``trainer.callback_metrics``.
        """
        if self._epoch_metrics_logged_in != self.current_epoch:
            self._epoch_metrics_logged_in = self.current_epoch
            aggregates = [("train/loss", self.train_loss, True), ("train/acc", self.train_acc, False)]
            if reg is not None:
                aggregates.append(("train/penalty", self.train_penalty, False))
            if consistency is not None:
                aggregates.append(("train/jsd", self.train_jsd, False))
            for name, metric, prog_bar in aggregates:
                # the accuracy is epoch-only and keeps its plain name, as before
                epoch_name = name if name == "train/acc" else f"{name}_epoch"
                self.log(epoch_name, metric, on_step=False, on_epoch=True, prog_bar=prog_bar)
                if epoch_name != name:
                    self.log(name, metric, on_step=False, on_epoch=True, logger=False)
        if writes_logs:
            self.log("train/loss_step", loss.detach().cpu(), on_step=True, on_epoch=False, prog_bar=True)
            if reg is not None:
                self.log("train/penalty_step", reg.detach().cpu(), on_step=True, on_epoch=False)
            if consistency is not None:
                self.log("train/jsd_step", consistency.detach().cpu(), on_step=True, on_epoch=False)

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, targets = batch
        logits = self(images)
        hard = self._hard_targets(targets)
        acc, top5 = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_acc_top5")
        acc(logits, hard)
        top5(logits, hard)
        self.log(f"{stage}/loss", self.data_loss(logits, targets), sync_dist=True, prog_bar=stage == "val")
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val")
        self.log(f"{stage}/acc_top5", top5)
        return logits

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        if not self.tta:
            self._evaluate(batch, "test")
            return
        images, targets = adapters.split_batch(batch, self)
        crop_size = next(
            (self.tta_kwargs.get(m, {}).get("crop_size") for m in tta_lib.CROP_MODES if m in self.tta), None
        )
        self._evaluate((tta_lib.plain_view(images, self.tta, crop_size), targets), "test")
        hard = self._hard_targets(targets)
        for mode in self.tta:
            metric = getattr(self, f"test_acc_tta_{mode}")
            metric(self.tta_probabilities(images, mode), hard)
            self.log(f"test/acc_tta_{mode}", metric)
            if mode == self.tta[0]:
                self.log("test/acc_tta", metric)

    def tta_probabilities(self, images: torch.Tensor, mode: str) -> torch.Tensor:
        """``mode``'s averaged class probabilities ``(N, num_classes)`` on a preprocessed batch, with the
        options of ``tta_kwargs``; ``color_pca`` reads the DataModule's training colour PCA."""
        options = dict(self.tta_kwargs.get(mode, {}))
        if mode == "color_pca":
            stats = self._color_statistics()
            options["color_shifts"] = tta_lib.color_pca_shifts(
                stats.eigval, stats.eigvec, images, options.pop("alpha", tta_lib.COLOR_PCA_ALPHA), stats.apply
            )
        return tta_lib.tta_probabilities(self, images, mode, **options)

    def _color_statistics(self) -> Any:
        trainer = attached_trainer(self)  # None for a bare predict_step call
        datamodule = None if trainer is None else trainer.datamodule
        stats = getattr(datamodule, "stats", None)
        if getattr(stats, "eigval", None) is None or not callable(getattr(stats, "apply", None)):
            raise RuntimeError(
                "tta='color_pca' needs the training split's colour PCA, read from the DataModule's fitted "
                "`stats` (the lightning_tricks DataModules have one); got "
                f"{'no DataModule' if datamodule is None else type(datamodule).__name__}. "
                "Use such a DataModule or remove color_pca from model.tta"
            )
        return stats

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """Class probabilities (averaged over the first ``tta`` mode's test-time views when set)."""
        images = adapters.inputs_of(batch, self)
        if self.tta:
            return self.tta_probabilities(images, self.tta[0])
        return self(images).softmax(dim=1)

    # -- optimisation -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Refuse, before training, settings the Trainer or DataModule cannot honour (SAM with a
        GradScaler or gradient accumulation, AGC beside ``gradient_clip_val``, the hinge loss with
        mixup/cutmix)."""
        if stage == "fit":
            check_fit_combinations(self, self.trainer)

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Adaptive gradient clipping when ``gradient_clipping`` is set, else Lightning's own clipping."""
        if self.gradient_clipping is None:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
            return
        head = {id(p) for p in self.head.parameters()} if self.gradient_clipping.exclude_head else set()
        params = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in head]
        clip_adaptively(params, self.gradient_clipping)

    def _global_batch_size(self) -> int | None:
        trainer = self.trainer
        batch_size = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule else None
        if batch_size is None:
            loader = trainer.train_dataloader
            batch_size = getattr(loader, "batch_size", None)
        if batch_size is None:
            return None
        return batch_size * trainer.world_size * trainer.accumulate_grad_batches

    def optimizer_param_groups(self) -> list[dict[str, Any]]:
        """The param groups :meth:`configure_optimizers` would build now for the trainable parameters
        (weight-decay split, ``lr_multipliers``, ``layer_decay``, linear scaling rule), each with its ``lr``;
        read by the unfreezing callbacks to add parameters to a running optimizer as if always there."""
        config = self.optimizer_config
        global_batch = self._global_batch_size()
        lr = scaled_lr(config.lr, config.base_batch_size, global_batch)
        groups = [{"lr": lr, **group} for group in build_param_groups(self.net, config, lr)]
        if config.base_batch_size is not None and global_batch is not None:
            for group in groups:
                group[LR_BATCH_KEY] = global_batch
        return groups

    def configure_optimizers(self) -> Any:
        total_steps = int(self.trainer.estimated_stepping_batches)  # loads the train loader (epoch budgets)
        global_batch = self._global_batch_size()
        optimizer = build_optimizer(self.net, self.optimizer_config, global_batch_size=global_batch)
        if self.optimizer_config.base_batch_size is not None and global_batch is not None:
            for group in optimizer.param_groups:
                group[LR_BATCH_KEY] = global_batch
        if self.trainer.train_dataloader is None:
            # A pure step budget (max_epochs=-1) estimates without loading the data; load it here, as
            # Lightning does for epoch budgets, so an epoch without batches is caught below.
            self.trainer.fit_loop.setup_data()
        batches = self.trainer.num_training_batches
        steps_per_epoch = (
            math.ceil(batches / self.trainer.accumulate_grad_batches)
            if math.isfinite(batches)
            else total_steps
        )
        # Before any schedule: a constant lr builds none, and max_steps keeps total_steps > 0.
        check_training_steps(total_steps, steps_per_epoch, self.trainer.train_dataloader)
        warn_batch_larger_than_data(self.trainer.train_dataloader)
        self._schedule_length = (
            schedule_length(self.scheduler_config, total_steps, steps_per_epoch),
            steps_per_epoch,
        )
        scheduler = build_scheduler(
            optimizer, self.scheduler_config, total_steps=total_steps, steps_per_epoch=steps_per_epoch
        )
        if scheduler is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    def follow_global_batch(self) -> None:
        """Rescale the learning rates when the global batch differs from the one they were scaled for.

        With ``optimizer.base_batch_size`` set, the rule ``lr = base_lr * global_batch / base_batch_size``
        holds whenever an epoch starts, also after Lightning's ``BatchSizeFinder`` changed the batch size or
        a ``GradientAccumulationScheduler`` changed the accumulation: every lr value of the optimizer and
        its schedulers (warm-up targets, cosine peaks, restart lrs...) is multiplied by
        ``new_batch / old_batch``, so the schedule keeps its shape. The batch each param group is scaled
        for is stored in the group itself (``lr_global_batch_size``), i.e. in the optimizer state that
        checkpoints and ``BatchSizeFinder``'s restore bring back together with the lr. Optimizers built
        elsewhere (without that key) are left alone.

        Example::

            # optimizer: {name: sgd, lr: 0.1, base_batch_size: 256}; accumulation 1 -> 4 at epoch 1
            trainer = L.Trainer(callbacks=[GradientAccumulationScheduler({0: 1, 1: 4})])
            # batch 64: lr 0.025 in epoch 0, 0.1 from epoch 1 on
        """
        if self.optimizer_config.base_batch_size is None:
            return
        batch = self._global_batch_size()
        if batch is None:
            return
        for optimizer in self.trainer.optimizers:
            scaled_for = [group.get(LR_BATCH_KEY) for group in optimizer.param_groups]
            if None in scaled_for or all(old == batch for old in scaled_for):
                continue
            schedulers = [
                c.scheduler for c in self.trainer.lr_scheduler_configs if c.scheduler.optimizer is optimizer
            ]
            scale_learning_rates(optimizer, schedulers, [batch / old for old in scaled_for])
            for group in optimizer.param_groups:
                group[LR_BATCH_KEY] = batch
            rank_zero_info(f"Linear scaling rule: global batch {scaled_for[0]} -> {batch}, lr rescaled")


@contextmanager
def frozen_norm_statistics(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` normalise with batch statistics but leave their running averages
    unchanged (momentum 0) inside the block.

    Example::

        with frozen_norm_statistics(net):
            loss = criterion(net(x), y)  # a second forward pass of the same step
    """
    norms = [
        m
        for m in module.modules()
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm))
    ]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
