"""scikit-learn's real handwritten digits as a small CIFAR-shaped data set (`--dataset digits`).

1,797 real 8x8 grey images (values 0..16) of the digits 0-9, shipped inside scikit-learn, so
they are there without any download: scaled to 0..255, resized bilinearly to 32x32, repeated
to 3 channels (uint8 RGB). A fixed quarter (a permutation seeded with 0) is the test set, the
rest the training set; class names are "0".."9". Flips and rotations change what a digit
means, so the reference augmentation hurts here: use it to compare recipes, not to score.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from eanet.data.dataset import ImageData
from eanet.errors import ConfigError, DataError

DIGITS_SPLIT_SEED = 0
DIGITS_TEST_FRACTION = 0.25


def _sklearn_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The raw 8x8 images (float, 0..16) and labels from scikit-learn."""
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError as exc:
        raise DataError(
            "--dataset digits needs scikit-learn, which is not installed; "
            "install it with: pip install 'eanet[digits]'"
        ) from exc
    d = sk_load_digits()
    return torch.tensor(d.images, dtype=torch.float32), torch.tensor(d.target, dtype=torch.int64)


def load_digits(data_path: str | Path | None = None, *, image_size: int = 32) -> ImageData:
    """The digits as uint8 RGB [N, 3, size, size]; 1,348 train and 449 test images."""
    if data_path is not None:
        raise ConfigError(
            f"--data-path {data_path} does not apply to --dataset digits "
            "(the images ship with scikit-learn); drop --data-path"
        )
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ConfigError(f"--image-size {image_size!r} must be a positive integer")
    images, labels = _sklearn_digits()
    x = images[:, None] * (255 / 16)  # (N, 1, 8, 8), 0..255
    x = F.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)  # (N, 3, size, size)
    gen = torch.Generator().manual_seed(DIGITS_SPLIT_SEED)
    perm = torch.randperm(len(labels), generator=gen)
    n_test = int(len(labels) * DIGITS_TEST_FRACTION)
    test, train = perm[:n_test], perm[n_test:]
    names = [str(i) for i in range(10)]
    return ImageData("digits", names, x[train], labels[train], x[test], labels[test])
