"""Validation split (the last fraction, as Keras) and a training set's normalization statistics."""

from __future__ import annotations

import math

import torch

from eanet.data.dataset import ImageData
from eanet.errors import ConfigError, DataError


def train_val_split(
    data: ImageData, fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training and validation tensors: the data set's own val split if any, else the tail."""
    if data.val_images is not None and data.val_labels is not None:
        return data.train_images, data.train_labels, data.val_images, data.val_labels
    return split_validation(data.train_images, data.train_labels, fraction)


def split_validation(
    images: torch.Tensor, labels: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first floor(N * (1 - fraction)) samples train, the rest validate, in order: Keras's
    `validation_split` (`train_validation_split`), float rounding included."""
    if not 0.0 <= fraction < 1.0:  # also rejects NaN
        raise ConfigError(f"validation fraction must be in [0, 1), got {fraction}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    split = math.floor(len(images) * (1.0 - fraction))
    return images[:split], labels[:split], images[split:], labels[split:]


def compute_normalization(
    images: torch.Tensor, batch: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and population variance in pixel space (0..255), plus the pixel count."""
    if images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(
            f"expected uint8 [N, C, H, W] images, got {images.dtype} {tuple(images.shape)}"
        )
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count == 0:
        raise DataError("no images to compute the normalization from; the data set is empty")
    # Pixel values are integers, so float64 sums stay exact (255^2 * 5e7 pixels is far below
    # 2^53) and E[x^2] - E[x]^2 loses nothing; chunks keep the float copy small.
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    squares = torch.zeros(images.shape[1], dtype=torch.float64)
    for start in range(0, images.shape[0], batch):
        chunk = images[start : start + batch].to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square_().sum(dim=(0, 2, 3))
    mean = total / count
    var = (squares / count - mean * mean).clamp_min(0.0)
    return mean.float(), var.float(), count
