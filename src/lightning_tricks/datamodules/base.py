"""DataModule bases: training-split statistics, resumable data order, device-side batch processing.

:class:`PreprocessedImageDataModule` holds what every image DataModule here shares: statistics
fitted on the training split only (per-channel mean/std, optionally the mean image and ZCA/PCA
whitening, and the colour PCA for lighting augmentation), a fingerprinted cache file,
:meth:`on_after_batch_transfer`, which augments, normalises and mixes batches on the training
device, and a checkpointed data order: the epoch's permutation, the batches of it already consumed
and the random-number streams, so a run resumed from any checkpoint (mid-epoch or at an epoch's
end) sees the batches, augmentation draws and dropout masks of the run that was never stopped.
Both are tied to the checkpoint's position in the data order rather than used up by the first batch
drawn, so callbacks that draw training batches before the first step leave the resumed run as is.

:class:`InMemoryImageDataModule` keeps the images as one ``(N, C, H, W)`` tensor (uint8 or float
in [0, 1]) and serves batches with one gather each
(:class:`~lightning_tricks.datamodules.in_memory.TensorBatchLoader`), optionally from tensors
resident on the accelerator; its training batches are augmented either on the device, vectorised
per batch, or per sample on the CPU with torchvision ``transforms.v2`` presets, each sample from its
own seed (:mod:`~lightning_tricks.datamodules.draws`), so that path resumes its draws exactly too.

Lightning calls ``setup`` before it restores a checkpoint's DataModule state and builds the
training loader after, so restored statistics and data order are in place before any batch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from lightning_tricks.datamodules import stats as stats_lib
from lightning_tricks.datamodules.augment import (
    BatchAugment,
    PresetContext,
    build_augmix_views,
    build_transform,
    preset_names,
)
from lightning_tricks.datamodules.draws import SeededDraws, SeededDrawSampler
from lightning_tricks.datamodules.flip import AlternatingFlip, check_flip_mode
from lightning_tricks.datamodules.in_memory import TensorBatchLoader, TransformedTensorDataset
from lightning_tricks.datamodules.on_device import ON_DEVICE_PRESETS, OnDeviceAugment
from lightning_tricks.datamodules.order import (
    ResumableDataLoader,
    ResumableSampler,
    capture_rng_states,
    restore_rng_states,
)
from lightning_tricks.datamodules.resampling import bootstrap_indices
from lightning_tricks.datamodules.stats import ImageStatistics


class PreprocessedImageDataModule(L.LightningDataModule, ABC):
    """Training statistics, their cache, resumable data order and the device-side batch hook.

    Subclasses implement :meth:`stats_fingerprint`, :meth:`fit_statistics` and the dataloaders
    (building them with :meth:`train_sampler` / :meth:`eval_sampler` keeps the order resumable).

    Args:
        batch_size: Per-device batch size.
        num_workers: DataLoader workers.
        pin_memory: Pin host memory for faster host-to-device copies.
        persistent_workers: Keep workers alive between epochs (default: when ``num_workers > 0``).
        normalize: Subtract the training mean and divide by the training std per channel.
        seed: Seed for splits, statistics subsets, sampling order and per-sample augmentation draws.
        augment: Per-sample augmentation preset name(s), see :mod:`~lightning_tricks.datamodules.augment`.
        augment_kwargs: Per-preset keyword overrides, e.g. ``{"random_erasing": {"p": 0.25}}``.
        batch_augment: ``"mixup"``, ``"cutmix"`` or both (soft ``(N, C)`` float targets).
        mixup_alpha: Beta parameter of mixup.
        cutmix_alpha: Beta parameter of cutmix.
        mixup_off_epoch: Stop mixing from this (0-based) epoch on (timm's ``mixup_off_epoch``), so
            the last epochs train on clean images and hard labels; ``None`` mixes every epoch.
        aug_repeats: Repeated augmentation: each training image ``aug_repeats`` times per epoch,
            in the same batch, with its own augmentation draw each time (1: off; 3 in DeiT).
        augmix_jsd: Yield each training image as a clean view and two AugMix views (``augmix``
            must be the last preset of ``augment``): a training batch of ``N`` images arrives as
            ``3N`` images ``[clean; view 1; view 2]`` with the labels repeated, for the recipe's
            Jensen-Shannon consistency loss (``regularization.jsd_lambda``).
        mean_image: Subtract the training mean image instead of the channel mean.
        std_image: Standardise per pixel, ``(x - mean image) / std image``, with each pixel's training
            mean and std, instead of per channel.
        whitening: ``None``, ``"zca"`` or ``"pca"`` whitening fitted on the training split.
        whitening_eps: Added to the whitening eigenvalues: the whitened training covariance has
            eigenvalues ``lambda / (lambda + eps)``, so the default 1e-2 whitens only the directions
            with ``lambda >> 1e-2`` (see :class:`~lightning_tricks.datamodules.stats.ImageStatistics`).
        stats_cache: Folder for the statistics cache file (named by a fingerprint of the training
            split and the options), or ``None`` to always recompute.
        bootstrap_seed: Bagging: train on a bootstrap resample of the training split (``n`` draws
            with replacement, seeded), so each ensemble member sees a different sample. ``None``
            trains on the split itself. Statistics always come from the whole training split.
    """

    num_classes: int
    in_channels: int
    #: Resizes normalised training batches on the device; set by
    #: :class:`~lightning_tricks.callbacks.ProgressiveResizing` for the duration of a fit.
    train_resize: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool | None = None,
        normalize: bool = True,
        seed: int = 0,
        augment: str | Sequence[str] | None = None,
        augment_kwargs: dict[str, dict[str, Any]] | None = None,
        batch_augment: str | Sequence[str] | None = None,
        mixup_alpha: float = 0.2,
        cutmix_alpha: float = 1.0,
        mixup_off_epoch: int | None = None,
        aug_repeats: int = 1,
        augmix_jsd: bool = False,
        mean_image: bool = False,
        whitening: str | None = None,
        whitening_eps: float = 1e-2,
        std_image: bool = False,
        stats_cache: str | Path | None = None,
        bootstrap_seed: int | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if persistent_workers and num_workers == 0:
            raise ValueError("persistent_workers=True needs num_workers > 0, got num_workers=0")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.persistent_workers = num_workers > 0 if persistent_workers is None else persistent_workers
        self.normalize = normalize
        self.seed = seed
        self.augment = preset_names(augment)
        self.augment_kwargs = dict(augment_kwargs or {})
        stray = [name for name in self.augment_kwargs if name not in self.augment]
        if stray:
            raise ValueError(f"augment_kwargs has entries {stray} for presets not in augment={self.augment}")
        self.batch_augment = [batch_augment] if isinstance(batch_augment, str) else list(batch_augment or [])
        # Validate names and alphas now; the module itself needs num_classes, known after setup.
        if self.batch_augment:
            BatchAugment(
                self.batch_augment, num_classes=2, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha
            )
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.mixup_off_epoch = _check_mixup_off_epoch(mixup_off_epoch, self.batch_augment)
        if not isinstance(aug_repeats, int) or aug_repeats < 1:
            raise ValueError(
                f"aug_repeats={aug_repeats} is out of range: it must be an integer >= 1 (1: off); "
                "e.g. aug_repeats: 3"
            )
        self.aug_repeats = aug_repeats
        if augmix_jsd and self.batch_augment:
            raise ValueError(
                f"augmix_jsd=True cannot be combined with batch_augment={self.batch_augment}: mixing "
                "would pair the clean and AugMix views of different images; set batch_augment: null"
            )
        self.augmix_jsd = augmix_jsd
        self.stats = ImageStatistics(
            normalize=normalize,
            mean_image=mean_image,
            whitening=whitening,
            eps=whitening_eps,
            std_image=std_image,
        )
        # Every preset option is checked now, not at the first batch (the image side is not known yet).
        self.preset_transform(PresetContext(size=1, stats=self.stats, check_size=False))
        self.stats_cache = None if stats_cache is None else Path(stats_cache)
        self.bootstrap_seed = bootstrap_seed
        self._batch_augment: BatchAugment | None = None
        self._train_sampler: ResumableSampler | None = None
        self._resume_order: dict[str, int] | None = None
        self._resume_rng: dict[str, Any] | None = None
        self._resume_point: dict[str, int] | None = None

    # Statistics ---------------------------------------------------------------------------
    @property
    def mean(self) -> torch.Tensor | None:
        """Per-channel training mean ``(C,)`` in [0, 1] units (``None`` before setup)."""
        return self.stats.mean

    @property
    def std(self) -> torch.Tensor | None:
        """Per-channel training std ``(C,)`` in [0, 1] units (``None`` before setup)."""
        return self.stats.std

    @abstractmethod
    def stats_fingerprint(self) -> str:
        """Identity of the training split (files, sizes, seed) for the statistics cache."""

    @abstractmethod
    def fit_statistics(self) -> None:
        """Fit ``self.stats`` on the training split."""

    def stats_cache_file(self) -> Path | None:
        """The cache file for the current split and options, or ``None`` when caching is off."""
        if self.stats_cache is None:
            return None
        key = stats_lib.fingerprint(
            split=self.stats_fingerprint(), options=self.stats.options(), cls=type(self).__name__
        )
        return self.stats_cache / f"lightning_tricks_stats_{key[:20]}.pt"

    def prepare_statistics(self) -> None:
        """Load the statistics from the cache file or fit and cache them (no-op once present)."""
        if self.stats.fitted:
            return
        cache = self.stats_cache_file()
        if cache is not None and cache.is_file():
            self.stats.load(cache)
            rank_zero_info(f"Loaded training-split statistics from {cache}")
            return
        self.fit_statistics()
        if cache is not None:
            _save_on_rank_zero(self.stats, cache)

    def build_batch_augment(self) -> None:
        if self.batch_augment and self._batch_augment is None:
            self._batch_augment = BatchAugment(
                self.batch_augment,
                self.num_classes,
                mixup_alpha=self.mixup_alpha,
                cutmix_alpha=self.cutmix_alpha,
            )

    def preset_transform(self, context: PresetContext) -> Callable:
        """The per-sample ``augment`` pipeline; with ``augmix_jsd`` it returns the three views."""
        if self.augmix_jsd:
            return build_augmix_views(self.augment, context, self.augment_kwargs)
        return build_transform(self.augment, context, self.augment_kwargs)

    # Device-side batch processing ---------------------------------------------------------
    def normalize_images(self, images: torch.Tensor) -> torch.Tensor:
        """uint8/float images -> float in [0, 1] -> preprocessed with the training statistics."""
        return self.stats.apply(images)

    def augment_batch(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training-only batch augmentation on the device before normalisation (identity here)."""
        return images, targets

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        images, targets = batch
        training = self.trainer is not None and self.trainer.training
        if self.augmix_jsd and images.ndim == 5:
            # Views come from the training loader only; callbacks may also draw its batches outside
            # the training stage (before-training checks), which get the same flat layout.
            images, targets = flatten_views(images, targets)
        if training:
            self._restore_resume_rng()
            images, targets = self.augment_batch(images, targets)
        images = self.normalize_images(images)
        if training and self.train_resize is not None:
            images = self.train_resize(images)
        if training and self._batch_augment is not None and self.mixing():
            images, targets = self._batch_augment(images, targets)
        return images, targets

    def _restore_resume_rng(self) -> None:
        """Continue the checkpoint's random streams at the training batch where it stopped.

        Keyed to the data-order position, not to the first batch seen: callbacks may draw training
        batches before the first step (sanity checks, probes), and each batch drawn at that position
        gets the same streams as the batch the fit loop then trains on (so does each batch of a
        several-batch probe there); anything run in between, e.g. the sanity check, is moot.
        Forgotten once the order has moved to a later epoch.
        """
        if self._resume_rng is None or self._resume_point is None:
            return
        if self.data_order_state() == self._resume_point:
            restore_rng_states(self._resume_rng)
        elif self._train_sampler is not None and self._train_sampler.epoch > self._resume_point["epoch"]:
            self._resume_rng = self._resume_point = None

    def mixing(self) -> bool:
        """Whether mixup/cutmix apply in the current epoch (``mixup_off_epoch``)."""
        if self.mixup_off_epoch is None or self.trainer is None:
            return True
        return self.trainer.current_epoch < self.mixup_off_epoch

    # Resumable order ---------------------------------------------------------------------------
    def _replicas(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)

    def train_sampler(self, length: int, seeded_draws: bool = False) -> ResumableSampler:
        """The shuffled order of the training split: a restored checkpoint's epoch and position, else
        the trainer's current epoch (Lightning calls ``set_epoch`` at every epoch start).

        ``seeded_draws`` yields ``(index, draw_seed)`` items for a
        :class:`~lightning_tricks.datamodules.draws.SeededDraws` dataset (the per-sample path).
        """
        replicas, rank = self._replicas()
        resume = self._resume_order or {}
        self._resume_order = None
        epoch = resume.get("epoch", self.trainer.current_epoch if self.trainer is not None else 0)
        sampler_cls = SeededDrawSampler if seeded_draws else ResumableSampler
        self._train_sampler = sampler_cls(
            length,
            batch_size=self.batch_size,
            num_replicas=replicas,
            rank=rank,
            seed=self.seed,
            epoch=epoch,
            start_batch=resume.get("batches_consumed", 0),
            repeats=self.aug_repeats,
        )
        return self._train_sampler

    def eval_sampler(self, length: int) -> ResumableSampler:
        """Ascending order, split across ranks like Lightning's distributed evaluation sampler."""
        replicas, rank = self._replicas()
        return ResumableSampler(
            length, batch_size=self.batch_size, num_replicas=replicas, rank=rank, shuffle=False
        )

    def data_order_state(self) -> dict[str, int]:
        """``{"epoch", "batches_consumed"}`` of the training order, as the fit loop has consumed it.

        The count comes from the fit loop's progress, not from the loader, because Lightning fetches
        one batch ahead of the one it trains on. A finished epoch is saved as the next epoch's start.
        """
        if self._train_sampler is None:
            return {"epoch": 0, "batches_consumed": 0}
        epoch, consumed = self._train_sampler.epoch, 0
        trainer = self.trainer
        if trainer is not None and trainer.state.fn == TrainerFn.FITTING:
            consumed = trainer.fit_loop.epoch_loop.batch_progress.current.processed
            if consumed >= trainer.num_training_batches:
                epoch, consumed = epoch + 1, 0
        return {"epoch": epoch, "batches_consumed": consumed}

    def state_dict(self) -> dict[str, Any]:
        """Training statistics, the data order and the random streams (Lightning saves neither)."""
        return {
            "statistics": self.stats.state_dict(),
            "data_order": self.data_order_state(),
            "rng": capture_rng_states(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        statistics = state_dict.get("statistics", state_dict)
        if "mean" in statistics:
            self.stats.load_state_dict(statistics)
        self._resume_order = dict(state_dict.get("data_order") or {}) or None
        self._resume_point = dict(self._resume_order) if self._resume_order else None
        self._resume_rng = state_dict.get("rng")

    def _dataloader(self, dataset: Dataset, train: bool) -> ResumableDataLoader:
        """A ``DataLoader`` over ``dataset``: for training in the resumable order, each sample's
        augmentation drawn from its own seed (:mod:`~lightning_tricks.datamodules.draws`)."""
        if train:
            if self.bootstrap_seed is not None:
                dataset = Subset(dataset, bootstrap_indices(len(dataset), self.bootstrap_seed).tolist())
            dataset = SeededDraws(dataset)
            sampler = self.train_sampler(len(dataset), seeded_draws=True)
        else:
            sampler = self.eval_sampler(len(dataset))
        return ResumableDataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=False,
            # Its own generator, so starting an epoch never draws from the global random stream.
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers,
        )


def _check_mixup_off_epoch(epoch: int | None, batch_augment: list[str]) -> int | None:
    if epoch is None:
        return None
    if not isinstance(epoch, int) or epoch < 1:
        raise ValueError(
            f"mixup_off_epoch={epoch} is out of range: it must be an epoch >= 1 (mixup stops from that "
            "epoch on) or null (mix every epoch); e.g. mixup_off_epoch: 90"
        )
    if not batch_augment:
        raise ValueError(
            f"mixup_off_epoch={epoch} has nothing to switch off: batch_augment is empty; "
            "set batch_augment: [mixup] (or cutmix), or mixup_off_epoch: null"
        )
    return epoch


def flatten_views(images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, V, C, H, W)`` views -> ``(V*N, C, H, W)`` ordered ``[view 0 of all; view 1 of all; ...]``
    with the targets repeated to match (timm's layout for its ``JsdCrossEntropy``)."""
    if images.ndim != 5:
        raise ValueError(f"augmix_jsd expects batches of views (N, V, C, H, W), got {tuple(images.shape)}")
    views = images.shape[1]
    return images.transpose(0, 1).flatten(0, 1), targets.repeat(views)


@rank_zero_only
def _save_on_rank_zero(stats: ImageStatistics, path: Path) -> None:
    stats.save(path)
    rank_zero_info(f"Saved training-split statistics to {path}")


class InMemoryImageDataModule(PreprocessedImageDataModule):
    """Shared split/statistics/augmentation logic; subclasses implement :meth:`load_splits`.

    Batches come from one gather each (:class:`~lightning_tricks.datamodules.in_memory.TensorBatchLoader`);
    only the per-sample CPU presets (``augment_on_device=False``) use a ``DataLoader`` with workers.

    Args:
        augment_on_device: Run ``augment`` vectorised per batch on the training device (presets
            ``flip``, ``translate``, ``crop_flip``, ``salt_pepper``, ``lens_distortion``) instead
            of per sample on the CPU (any preset).
        pad_mode: Padding of ``translate``/``crop_flip``: ``"reflect"`` or ``"zeros"``.
        flip_mode: How ``flip``/``crop_flip`` flip: ``"random"`` (each image with probability
            ``p`` in every epoch, the default) or ``"alternating"`` (airbench: each image with
            probability ``p`` in epoch 0, then the opposite way in every following epoch;
            deterministic per image index, so resumed runs repeat it exactly; with ``aug_repeats``
            an image's copies share the flip and differ in the other draws).
        data_on_device: Keep every split resident on the training device (moved once, at the
            first dataloader), so an epoch copies no images from host to device.
        **kwargs: See :class:`PreprocessedImageDataModule`.

    Example::

        class MyData(InMemoryImageDataModule):
            num_classes, in_channels, image_size = 10, 3, 32

            def load_splits(self):
                return {"train": (train_uint8, train_labels), "test": (test_uint8, test_labels)}

        dm = MyData(augment="crop_flip", batch_augment=["mixup", "cutmix"])
    """

    image_size: int

    def __init__(
        self,
        batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        normalize: bool = True,
        seed: int = 0,
        augment: str | Sequence[str] | None = None,
        augment_on_device: bool = True,
        pad_mode: str = "reflect",
        flip_mode: str = "random",
        data_on_device: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            normalize=normalize,
            seed=seed,
            augment=augment,
            **kwargs,
        )
        if augment_on_device:
            # validates names and pad_mode now
            OnDeviceAugment(self.augment, pad_mode=pad_mode, options=self.augment_kwargs)
        else:
            PresetContext(size=1, pad_mode=pad_mode)
        per_sample = bool(self.augment) and not augment_on_device
        if data_on_device and per_sample:
            raise ValueError(
                f"data_on_device=True needs batched loading, but augment={self.augment} with "
                "augment_on_device=False runs per sample on the CPU; set augment_on_device=True "
                f"(presets {', '.join(ON_DEVICE_PRESETS[1:])}) or data_on_device=False"
            )
        if num_workers > 0 and not per_sample:
            rank_zero_warn(
                f"num_workers={num_workers} has no effect: in-memory batches are gathered in the main "
                "process (workers only serve augment_on_device=False); set num_workers=0"
            )
        self.flip_mode = check_flip_mode(flip_mode, self.augment, augment_on_device)
        self.augment_on_device = augment_on_device
        self.pad_mode = pad_mode
        self.data_on_device = data_on_device
        self._splits: dict[str, TensorDataset] = {}
        self._resident: dict[str, tuple[torch.Tensor, ...]] = {}
        self._device_augment: OnDeviceAugment | None = None

    @abstractmethod
    def load_splits(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Return ``{"train": (images, labels), "val": ..., "test": ...}``; val/test may be absent."""

    def setup(self, stage: str | None = None) -> None:
        if not self._splits:
            self._splits = {name: TensorDataset(x, y) for name, (x, y) in self.load_splits().items()}
        self.prepare_statistics()
        self.build_batch_augment()
        if self.augment and not self.augment_on_device:
            self.train_transform()  # options that depend on the image side fail here, not in a worker
        if self.augment_on_device and self._device_augment is None:
            self._device_augment = OnDeviceAugment(
                self._device_presets(),
                pad=self._pad(),
                pad_mode=self.pad_mode,
                flip_p=self._flip_p(),
                options=self.augment_kwargs,
            )

    def _device_presets(self) -> list[str]:
        """The on-device presets; with alternating flips the loader flips, so they only translate."""
        if self.flip_mode == "random":
            return self.augment
        renamed = {"flip": None, "crop_flip": "translate"}
        return [renamed.get(name, name) for name in self.augment if renamed.get(name, name) is not None]

    def _flip_p(self) -> float:
        return next((kw["p"] for kw in self.augment_kwargs.values() if "p" in kw), 0.5)

    def _pad(self) -> int:
        default = max(1, self.image_size // 8)
        return next((kw["pad"] for kw in self.augment_kwargs.values() if "pad" in kw), default)

    def stats_fingerprint(self) -> str:
        return stats_lib.tensor_fingerprint(self._splits["train"].tensors[0])

    def fit_statistics(self) -> None:
        self.stats.fit(self._splits["train"].tensors[0], seed=self.seed)

    def train_transform(self) -> Callable:
        """The per-sample CPU pipeline of the ``augment`` presets (``augment_on_device=False``)."""
        context = PresetContext(
            size=self.image_size,
            pad=self._pad(),
            pad_mode=self.pad_mode,
            stats=self.stats,
            autoaugment_policy=getattr(self, "autoaugment_policy", "imagenet"),
        )
        return self.preset_transform(context)

    def _split(self, split: str) -> TensorDataset:
        if split not in self._splits:
            raise RuntimeError(f"{type(self).__name__} has no {split!r} split; call setup() first")
        return self._splits[split]

    def _tensors(self, split: str) -> tuple[torch.Tensor, ...]:
        """The split's ``(images, labels)``, moved once to the training device with ``data_on_device``."""
        tensors = self._split(split).tensors
        if not self.data_on_device or self.trainer is None:
            return tensors
        device = self.trainer.strategy.root_device
        if split not in self._resident or self._resident[split][0].device != device:
            self._resident[split] = tuple(t.to(device) for t in tensors)
        return self._resident[split]

    def train_dataloader(self) -> TensorBatchLoader | DataLoader:
        if self.augment and not self.augment_on_device:
            images, labels = self._split("train").tensors
            return self._dataloader(
                TransformedTensorDataset(images, labels, self.train_transform()), train=True
            )
        tensors = self._tensors("train")
        index = None
        if self.bootstrap_seed is not None:
            index = bootstrap_indices(len(tensors[1]), self.bootstrap_seed)
        length = len(tensors[1]) if index is None else len(index)
        flip = None
        if self.flip_mode == "alternating":
            flip = AlternatingFlip(
                len(tensors[1]), p=self._flip_p(), seed=self.seed, device=tensors[0].device
            )
        return TensorBatchLoader(
            tensors,
            self.batch_size,
            self.train_sampler(length),
            index=index,
            pin_memory=self.pin_memory,
            flip=flip,
        )

    def _eval_loader(self, split: str) -> TensorBatchLoader:
        tensors = self._tensors(split)
        return TensorBatchLoader(
            tensors, self.batch_size, self.eval_sampler(len(tensors[1])), pin_memory=self.pin_memory
        )

    def val_dataloader(self) -> TensorBatchLoader | list:
        if "val" not in self._splits and "train" in self._splits:
            return []
        return self._eval_loader("val")

    def test_dataloader(self) -> TensorBatchLoader:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        # A plain DataLoader: Lightning's predict loop tracks sample indices through its sampler.
        return DataLoader(self._split("test"), batch_size=self.batch_size, shuffle=False)

    def augment_batch(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the on-device presets to a training batch (already on the device)."""
        if self._device_augment is not None:
            images = self._device_augment(images)
        return images, targets
