from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest, chi2_contingency, chisquare
from torch.nn import functional as F
from torchvision.transforms import v2

from lightning_tricks.datamodules.on_device import OnDeviceAugment, crop_with_offsets

SIZE, PAD, N = 8, 2, 3000


def test_crop_matches_padded_reference():
    images = torch.randint(0, 256, (6, 3, SIZE, SIZE), dtype=torch.uint8)
    dy, dx = torch.tensor([0, 1, 2, 3, 4, 2]), torch.tensor([4, 3, 2, 1, 0, 0])
    for mode, torch_mode in (("reflect", "reflect"), ("zeros", "constant")):
        padded = F.pad(images.float(), (PAD,) * 4, mode=torch_mode)
        expected = torch.stack(
            [
                padded[i, :, y : y + SIZE, x : x + SIZE]
                for i, (y, x) in enumerate(zip(dy.tolist(), dx.tolist(), strict=True))
            ]
        )
        out = crop_with_offsets(images, dy, dx, PAD, mode)
        assert out.dtype == torch.uint8 and torch.equal(out.float(), expected)
        flip = torch.tensor([True, False, True, False, False, True])
        mirrored = crop_with_offsets(images, dy, dx, PAD, mode, flip=flip)
        assert torch.equal(
            mirrored.float(), torch.where(flip[:, None, None, None], expected.flip(-1), expected)
        )
    with pytest.raises(ValueError, match="pad mode"):
        crop_with_offsets(images, dy, dx, PAD, "wrap")
    with pytest.raises(ValueError, match=r"augment_on_device=False"):
        OnDeviceAugment(["crop_flip", "autoaugment"])


def _coordinate_image() -> torch.Tensor:
    rows = torch.arange(1, SIZE + 1).view(SIZE, 1).expand(SIZE, SIZE)
    cols = torch.arange(1, SIZE + 1).view(1, SIZE).expand(SIZE, SIZE)
    return torch.stack([rows, cols]).to(torch.uint8)  # channel 0: row + 1, channel 1: column + 1


def _offsets_and_flips(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recover (dy, dx, flipped) of zero-padded crops of the coordinate image."""
    rows, cols = out[:, 0].amax(dim=2).long(), out[:, 1].amax(dim=1).long()  # (N, SIZE) each
    first_row = (rows > 0).long().argmax(dim=1)
    dy = rows[torch.arange(len(out)), first_row] - 1 - first_row + PAD
    # Columns increase left to right unless flipped; read offsets off the unflipped order.
    nonzero = cols > 0
    first, last = nonzero.long().argmax(dim=1), SIZE - 1 - nonzero.flip(1).long().argmax(dim=1)
    idx = torch.arange(len(out))
    flipped = cols[idx, first] > cols[idx, last]
    cols = torch.where(flipped[:, None], cols.flip(1), cols)
    first = (cols > 0).long().argmax(dim=1)
    dx = cols[idx, first] - 1 - first + PAD
    return dy, dx, flipped


def test_on_device_and_cpu_paths_agree_in_distribution():
    image = _coordinate_image()
    torch.manual_seed(0)
    device_out = OnDeviceAugment(["crop_flip"], pad=PAD, pad_mode="zeros")(image.expand(N, -1, -1, -1))
    cpu = v2.Compose([v2.RandomCrop(SIZE, padding=PAD, padding_mode="constant"), v2.RandomHorizontalFlip()])
    cpu_out = torch.stack([cpu(image) for _ in range(N)])
    bins = 2 * PAD + 1
    tables = []
    for out in (device_out, cpu_out):
        dy, dx, flipped = _offsets_and_flips(out)
        assert dy.min() >= 0 and dy.max() <= 2 * PAD and dx.min() >= 0 and dx.max() <= 2 * PAD
        assert binomtest(int(flipped.sum()), N, 0.5).pvalue > 0.001
        joint = torch.bincount(dy * bins + dx, minlength=bins * bins)
        assert chisquare(joint.numpy()).pvalue > 0.001  # uniform over the (2*pad+1)^2 offsets
        tables.append(joint.numpy())
    assert chi2_contingency(tables).pvalue > 0.001  # the two paths share one distribution
