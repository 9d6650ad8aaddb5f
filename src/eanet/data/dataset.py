"""`ImageData`, a labelled image set as uint8 tensors, and random CIFAR-shaped data for timing."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ImageData:
    """A labelled image set held as uint8 tensors."""

    name: str
    class_names: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    # A validation split of its own (a folder's val/); None: hold out the tail of train.
    val_images: torch.Tensor | None = None
    val_labels: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        """Number of classes (length of class_names)."""
        return len(self.class_names)


def synthetic_cifar(
    train: int = 50_000, test: int = 10_000, classes: int = 100, seed: int = 0
) -> ImageData:
    """Random CIFAR-shaped images and labels: for timing the full recipe where no data is."""
    g = torch.Generator().manual_seed(seed)
    return ImageData(
        "synthetic",
        [f"class_{i}" for i in range(classes)],
        torch.randint(0, 256, (train, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, classes, (train,), generator=g),
        torch.randint(0, 256, (test, 3, 32, 32), dtype=torch.uint8, generator=g),
        torch.randint(0, classes, (test,), generator=g),
    )
