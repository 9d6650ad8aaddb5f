"""Checks of a command's arguments that need no torch: run before anything is said or loaded.

A wrong path or value is refused in one line at once, instead of after torch has loaded
(seconds) and the command has announced what it is doing. The checks look at names, kinds
and the first bytes of files; what a file holds is checked by the code that reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from eanet.errors import ConfigError, DataError
from eanet.fileio import BEST_NAME, CHECKPOINT_NAME, resolve

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".gif", ".bmp", ".webp"})
_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")


def is_image_file(path: Path) -> bool:
    """A file named or starting like a PNG, JPEG, GIF, BMP or WebP image."""
    if not path.is_file():
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    try:
        with path.open("rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head.startswith(_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def is_run_or_checkpoint(path: Path) -> bool:
    """A run directory (it holds a checkpoint) or a .safetensors file."""
    if path.is_dir():
        return (path / CHECKPOINT_NAME).is_file() or (path / BEST_NAME).is_file()
    return path.is_file() and path.suffix == ".safetensors"


def check_checkpoint(path: Path, weights: str, usage: str) -> None:
    """Refuse a checkpoint argument that is an image, or names no checkpoint file
    (`eanet.fileio.resolve`, which `eanet.checkpoint` uses too), without loading torch.

    `usage`: the command's order of arguments, said when an image stands first.
    """
    if is_image_file(path):
        raise ConfigError(f"{path} is an image, not a run or checkpoint: the order is {usage}")
    resolve(path, weights)


def check_image_inputs(inputs: Sequence[str | Path], usage: str) -> None:
    """Refuse a run directory or checkpoint among the images (the arguments swapped, or a
    second run): a run's folder holds PNG figures that would be predicted as images."""
    for item in map(Path, inputs):
        if is_run_or_checkpoint(item):
            raise ConfigError(
                f"{item} is a run or checkpoint, not an image: the order is {usage} (one run)"
            )


def check_positive(flag: str, value: int) -> None:
    """Refuse a count that is not a positive integer."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{flag} {value!r} must be a positive integer")


def check_data_path(dataset: str | None, data_path: str | Path | None) -> None:
    """Refuse a --data-path that names nothing, for a data set read from one (CIFAR,
    Fashion-MNIST, a folder; None: a run's, any of them). digits' loader says it does not
    apply; synthetic data has none."""
    if dataset in ("digits", "synthetic") or data_path is None:
        return
    if not Path(data_path).expanduser().exists():
        raise DataError(f"{data_path}: no such file or folder (--data-path)")
