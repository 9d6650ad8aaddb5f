"""One entry point for every data set by name: CIFAR, Fashion-MNIST, folders, digits, synthetic."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from eanet.choices import DATASET_NAMES
from eanet.data.cifar import DATASETS, _spec, load_cifar
from eanet.data.dataset import ImageData, synthetic_cifar
from eanet.errors import ConfigError, DataError


def load_dataset(
    name: str,
    data_path: str | Path | None = None,
    *,
    image_size: int | None = None,
    synthetic_images: int = 50_000,
    channels: int | None = None,
    **kwargs: Any,
) -> ImageData:
    """Load a data set by name (DATASET_NAMES); kwargs go to the specific loader.

    `image_size` is the side a folder's images are resized to (default 32); CIFAR is 32 only.
    `synthetic_images`: the training images of 'synthetic' (and a fifth as many to test).
    `channels`: the model's input channels; fashion-mnist gives 1 its native grey 28x28 and
    3 (or None) the reference's 32x32 RGB (padded); the other sets are RGB whatever it says.
    """
    if name == "fashion-mnist":
        return _fashion(data_path, image_size, channels or 3, **kwargs)
    if name == "folder":
        from eanet.data.folders import load_folder

        return load_folder(data_path, image_size=image_size or 32, **kwargs)
    if name == "digits":  # the shipped real 8x8 digits; md5/verify/progress do not apply
        from eanet.data.digits import load_digits

        return load_digits(data_path, image_size=image_size or 32)
    if name == "synthetic":  # random CIFAR-100-shaped data, only to time the recipe
        return synthetic_cifar(train=synthetic_images, test=synthetic_images // 5)
    if name not in DATASETS:
        raise DataError(
            f"unknown data set {name!r}; choose one of: {', '.join(sorted(DATASET_NAMES))}"
        )
    if image_size not in (None, 32):
        raise ConfigError(
            f"--image-size {image_size} applies to --dataset folder; {name} images are 32x32"
        )
    spec = _spec(name)
    return load_cifar(spec.name, data_path, **kwargs)


def _fashion(
    data_path: str | Path | None, image_size: int | None, channels: int, **kwargs: Any
) -> ImageData:
    """Fashion-MNIST at 28x28 (1 channel) or padded to 32x32 (3), as the model takes it."""
    from eanet.data.fashion import load_fashion_mnist

    side = 28 if channels == 1 else 32
    if image_size not in (None, side):
        raise ConfigError(
            f"--image-size {image_size} applies to --dataset folder or digits; fashion-mnist "
            f"images are {side}x{side} for a {channels}-channel model"
        )
    return load_fashion_mnist(data_path, channels=channels, **kwargs)
