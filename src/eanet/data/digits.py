"""Real handwritten digits, shipped in the package, as a CIFAR-shaped set (`--dataset digits`).

The 1,797 real 8x8 grey images (values 0..16) of the digits 0-9 that scikit-learn ships (the
UCI "Optical Recognition of Handwritten Digits" test set; provenance and licences in
assets/README.md), stored in `assets/digits.npz`, so they are there without any download or
extra package: scaled to 0..255, resized bilinearly to 32x32, repeated to 3 channels (uint8 RGB).
A fixed quarter (a permutation seeded with 0) is the test set, the rest the training set; class
names are "0".."9". Flips and rotations change what a digit means, so the reference
augmentation hurts here: use it to compare recipes, not to score.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eanet.data.dataset import ImageData
from eanet.errors import ConfigError, DataError

DIGITS_ASSET: Path = Path(__file__).parent.parent / "assets" / "digits.npz"
DIGITS_COUNT = 1797
DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25


def raw_digits(path: Path = DIGITS_ASSET) -> tuple[torch.Tensor, torch.Tensor]:
    """The raw 8x8 images (float, 0..16) [1797, 8, 8] and labels 0..9 from the shipped asset."""
    try:
        with np.load(path, allow_pickle=False) as f:  # arrays only: never unpickle
            images, labels = f["images"], f["labels"]
    except (OSError, KeyError, ValueError) as exc:
        raise DataError(
            f"the shipped digits file {path} is missing or damaged ({exc}); reinstall eanet"
        ) from exc
    if images.shape != (DIGITS_COUNT, 8, 8) or labels.shape != (DIGITS_COUNT,):
        raise DataError(
            f"the shipped digits file {path} holds images {images.shape} and labels "
            f"{labels.shape}, not ({DIGITS_COUNT}, 8, 8) and ({DIGITS_COUNT},); reinstall eanet"
        )
    x = torch.from_numpy(images.astype(np.float32))
    return x, torch.from_numpy(labels.astype(np.int64))


def load_digits(data_path: str | Path | None = None, *, image_size: int = 32) -> ImageData:
    """The digits as uint8 RGB [N, 3, size, size]; 1,348 train and 449 test images."""
    if data_path is not None:
        raise ConfigError(
            f"--data-path {data_path} does not apply to --dataset digits "
            "(the images ship with eanet); drop --data-path"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"--image-size {image_size!r} must be a positive integer")
    images, labels = raw_digits()
    x = images[:, None] * (255 / 16)  # (N, 1, 8, 8), 0..255
    x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)  # (N, 3, size, size)
    gen = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    perm = torch.randperm(len(labels), generator=gen)
    n_test = int(len(labels) * DIGITS_TEST_FRACTION)
    test, train = perm[:n_test], perm[n_test:]
    names = [str(i) for i in range(10)]
    return ImageData("digits", names, x[train], labels[train], x[test], labels[test])
