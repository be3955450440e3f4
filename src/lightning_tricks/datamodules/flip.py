"""airbench's alternating flip: each image is mirrored in every other epoch instead of at random.

airbench94 (Jordan 2024) flips each training image with probability 0.5 once, before epoch 0, and
then mirrors the whole set in every odd epoch, so image ``i`` is flipped in epoch ``e`` iff
``first_flip[i] XOR (e is odd)``: every image is seen both ways in any two consecutive epochs,
which random flipping only achieves on average. Here ``first_flip`` is a pure function of the
DataModule's ``seed`` and the training-set size, and the epoch is the sampler's, so a run resumed
from a checkpoint flips every image exactly as the uninterrupted run (no extra state to save).
Hand-written because neither torchvision nor timm has a flip that depends on the image index.

Example::

    flip = AlternatingFlip(len(train_images), seed=0)
    rows = torch.tensor([3, 7])
    flip.flips(rows, epoch=1) == ~flip.flips(rows, epoch=0)  # tensor([True, True])
    batch = flip(train_images[rows], rows, epoch=1)
"""

from __future__ import annotations

import torch

__all__ = ["FLIP_MODES", "AlternatingFlip", "check_flip_mode"]

FLIP_MODES = ("random", "alternating")
# Mixed into the seed so the epoch-0 flips are not drawn from the same stream as the epoch-0 order
# (``ResumableSampler`` seeds its permutation with ``seed + epoch``).
_SEED_SALT = 0x5F11B


def check_flip_mode(flip_mode: str, augment: list[str], augment_on_device: bool) -> str:
    """Validate the DataModule's ``flip_mode`` against its ``augment`` presets; return it."""
    if flip_mode not in FLIP_MODES:
        raise ValueError(
            f"flip_mode={flip_mode!r} is not one of {list(FLIP_MODES)}: 'random' flips each image "
            "with probability p in every epoch, 'alternating' flips it in every other epoch "
            "(airbench); e.g. flip_mode: alternating"
        )
    if flip_mode == "random":
        return flip_mode
    if not {"flip", "crop_flip"} & set(augment):
        raise ValueError(
            f"flip_mode='alternating' has no flip to alternate: augment={augment} has neither 'flip' "
            "nor 'crop_flip'; add one of them to augment or set flip_mode: random"
        )
    if not augment_on_device:
        raise ValueError(
            "flip_mode='alternating' needs batched loading, which knows each image's index, but "
            "augment_on_device=False runs per sample on the CPU; set augment_on_device=True or "
            "flip_mode: random"
        )
    return flip_mode


class AlternatingFlip:
    """Per-image flips that alternate between epochs (airbench's rule), deterministic per index.

    Args:
        length: Number of training images (rows of the stored tensor).
        p: Probability that an image is flipped in epoch 0 (airbench: 0.5).
        seed: Seed of the epoch-0 draw.
        device: Device of the rows passed in (where the mask lives).

    Example::

        flip = AlternatingFlip(50_000, seed=0, device="cuda")
        images = flip(images, rows, epoch)  # rows: the dataset indices of the batch
    """

    def __init__(
        self, length: int, p: float = 0.5, seed: int = 0, device: torch.device | str | None = None
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"flip probability p must be in [0, 1], got {p}")
        generator = torch.Generator().manual_seed(seed + _SEED_SALT)
        self.first_epoch = (torch.rand(length, generator=generator) < p).to(device)

    def flips(self, rows: torch.Tensor, epoch: int) -> torch.Tensor:
        """Whether each of ``rows`` is flipped in ``epoch``: ``first_epoch[rows] XOR (epoch odd)``."""
        return self.first_epoch[rows] ^ bool(epoch % 2)

    def __call__(self, images: torch.Tensor, rows: torch.Tensor, epoch: int) -> torch.Tensor:
        """Mirror left-right the images of ``rows`` that :meth:`flips` selects in ``epoch``."""
        flip = self.flips(rows, epoch)
        return torch.where(flip[:, None, None, None], images.flip(-1), images)
