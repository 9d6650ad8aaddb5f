"""Fashion-MNIST: Zalando's 70,000 real 28x28 grey clothing photos, 10 classes (MIT licence).

Four idx files (`train-images-idx3-ubyte` and the rest; gzipped or plain) are found in this
order: `--data-path FOLDER`; Debian's package `dataset-fashion-mnist` (/usr/share/datasets/
fashion-mnist); the download cache ($EANET_DATA or ~/.cache/eanet, `fashion-mnist/`), where
missing files are downloaded from the official site (each archive's md5 checked while it
streams). Debian recompressed its .gz files, so what is verified everywhere is the sha256 of
the DECOMPRESSED contents (`--no-verify` skips it for files of your own).

The native images are uint8 [N, 1, 28, 28]; `channels=3` gives the reference models
(`eanet-cifar`, `vit-cifar`) their 32x32 RGB input unchanged: 2 zero pixels on each side
(the background is black) and the grey plane repeated three times. The last 20% of the
training set is the validation split, as for CIFAR (`splits.train_val_split`).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from eanet.data.dataset import ImageData
from eanet.data.download import default_cache_dir, download
from eanet.errors import ConfigError, DataError, one_line

log = logging.getLogger(__name__)

NAME = "fashion-mnist"
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
URL_BASE = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
PACKAGE_DIR = Path("/usr/share/datasets/fashion-mnist")
APT_PACKAGE = "dataset-fashion-mnist"
SIDE = 28
IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # ubyte, 3 dimensions / 1 dimension


@dataclass(frozen=True)
class IdxFile:
    """One of the four files: its name (without .gz) and checksums."""

    name: str
    magic: int
    md5: str  # of the official .gz archive (checked while downloading)
    sha256: str  # of the decompressed idx file (Debian's .gz differ from the official ones)


TRAIN_IMAGES = IdxFile(
    "train-images-idx3-ubyte",
    IMAGES_MAGIC,
    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
)
TRAIN_LABELS = IdxFile(
    "train-labels-idx1-ubyte",
    LABELS_MAGIC,
    "25c81989df183df01b3e8a0aad5dffbe",
    "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
)
TEST_IMAGES = IdxFile(
    "t10k-images-idx3-ubyte",
    IMAGES_MAGIC,
    "bef4ecab320f06d8554ea6380940ec79",
    "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
)
TEST_LABELS = IdxFile(
    "t10k-labels-idx1-ubyte",
    LABELS_MAGIC,
    "bb300cfdad3c16e7a12a480ee83cd310",
    "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
)
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

_GZIP_MAGIC = b"\x1f\x8b"
_CHUNK = 1 << 20


def _where_to_get() -> str:
    """The three ways to the files, for every message that lacks them."""
    return (
        f"install Debian's copy (apt-get install {APT_PACKAGE}), download the four .gz files "
        f"from {URL_BASE}, or pass --data-path FOLDER holding them"
    )


_BAD = "the file is truncated or corrupt: get it again (" + _where_to_get() + ")"


def _open(path: Path) -> BinaryIO:
    """The file, decompressed on the fly when it is gzip (told by its first bytes)."""
    f = open(path, "rb")  # noqa: SIM115 (returned to the caller's with)
    if f.read(2) == _GZIP_MAGIC:
        f.close()
        return gzip.open(path, "rb")  # type: ignore[return-value]
    f.seek(0)
    return f


def _read_exactly(f: BinaryIO, size: int) -> bytes:
    """Up to size + 1 bytes, in chunks (a lying header cannot make us allocate its claim)."""
    parts, left = [], size + 1
    while left > 0 and (block := f.read(min(_CHUNK, left))):
        parts.append(block)
        left -= len(block)
    return b"".join(parts)


def _parse(raw: bytes, path: Path, magic: int) -> np.ndarray:
    """The array an idx file holds, after checking its header against its length."""
    dims = 3 if magic == IMAGES_MAGIC else 1
    header = 4 + 4 * dims
    kind = "images" if magic == IMAGES_MAGIC else "labels"
    found = int.from_bytes(raw[:4], "big")
    if len(raw) >= 4 and found != magic:
        raise DataError(
            f"{path}: magic number 0x{found:08x}, not 0x{magic:08x} (idx {kind}); "
            f"it is not a Fashion-MNIST {kind} file"
        )
    if len(raw) < header:
        raise DataError(f"{path}: {len(raw)} bytes, shorter than an idx header; {_BAD}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    if dims == 3 and shape[1:] != (SIDE, SIDE):
        raise DataError(
            f"{path}: images are {shape[1]}x{shape[2]}, not {SIDE}x{SIDE}; "
            "it is not a Fashion-MNIST file"
        )
    expected = header + math.prod(shape)
    if len(raw) != expected:
        got = "more bytes" if len(raw) > expected else f"{len(raw) - header} bytes"
        raise DataError(
            f"{path}: {got} of data where the header's {shape[0]} {kind} need "
            f"{expected - header}; {_BAD}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def read_idx(path: Path, magic: int) -> tuple[np.ndarray, str]:
    """An idx file (gzipped or plain) as a uint8 array, checked, and its contents' sha256."""
    dims = 3 if magic == IMAGES_MAGIC else 1
    try:
        with _open(path) as f:
            head = f.read(4 + 4 * dims)
            sizes = [int.from_bytes(head[i : i + 4], "big") for i in range(4, len(head) - 3, 4)]
            raw = head + _read_exactly(f, math.prod(sizes) if len(sizes) == dims else 0)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(
            f"{path}: cannot read it ({one_line(exc, with_type=True)}); {_BAD}"
        ) from exc
    return _parse(raw, path, magic), hashlib.sha256(raw).hexdigest()


def _find(folder: Path, spec: IdxFile) -> Path | None:
    """NAME.gz or the plain NAME in folder, if either is a file."""
    for path in (folder / f"{spec.name}.gz", folder / spec.name):
        if path.is_file():
            return path
    return None


def _from_folder(folder: Path, what: str) -> dict[IdxFile, Path]:
    """The four files in a folder the user named; a DataError lists what is missing."""
    found = {spec: _find(folder, spec) for spec in FILES}
    missing = [spec.name for spec, path in found.items() if path is None]
    if missing:
        raise DataError(
            f"{folder}: {what} lacks {', '.join(missing)} (.gz or plain); a Fashion-MNIST "
            f"folder holds the four files of {URL_BASE}"
        )
    return found  # type: ignore[return-value]


def _from_cache(fetch: bool, verify: bool, progress: bool) -> dict[IdxFile, Path]:
    """The files in the download cache, downloading the missing ones first if allowed."""
    folder = default_cache_dir() / NAME
    found: dict[IdxFile, Path] = {}
    for spec in FILES:
        path = _find(folder, spec)
        if path is None:
            url = URL_BASE + f"{spec.name}.gz"
            if not fetch:
                raise DataError(
                    f"{NAME}: not in {PACKAGE_DIR} nor in {folder} and downloading is off; "
                    + _where_to_get()
                )
            try:
                path = download(
                    url, folder / f"{spec.name}.gz", spec.md5 if verify else None, progress=progress
                )
            except DataError as exc:
                raise DataError(f"{exc}; or apt-get install {APT_PACKAGE}") from exc
        found[spec] = path
    return found


def locate(
    data_path: str | Path | None = None,
    *,
    fetch: bool = True,
    verify: bool = True,
    progress: bool = True,
) -> dict[IdxFile, Path]:
    """The four files: in data_path, else Debian's package, else the (downloaded) cache."""
    if data_path is not None:
        folder = Path(data_path).expanduser()
        if not folder.is_dir():
            raise DataError(
                f"{folder}: not a folder; --data-path for {NAME} is the folder holding "
                f"{', '.join(s.name + '.gz' for s in FILES)}"
            )
        return _from_folder(folder, "--data-path")
    if all(_find(PACKAGE_DIR, spec) for spec in FILES):
        return _from_folder(PACKAGE_DIR, f"Debian's {APT_PACKAGE}")
    return _from_cache(fetch, verify, progress)


def _read(files: dict[IdxFile, Path], verify: bool) -> dict[IdxFile, np.ndarray]:
    """Each file read, checked and (verify) compared with the official contents."""
    out = {}
    for spec, path in files.items():
        array, sha256 = read_idx(path, spec.magic)
        if verify and sha256 != spec.sha256:
            raise DataError(
                f"{path}: decompressed sha256 {sha256} is not the official {spec.name}'s "
                f"{spec.sha256}; the file is altered or corrupt: get it again "
                f"({_where_to_get()}), or pass --no-verify if it is your own"
            )
        out[spec] = array
    return out


def _pair(
    arrays: dict[IdxFile, np.ndarray],
    files: dict[IdxFile, Path],
    image_spec: IdxFile,
    label_spec: IdxFile,
) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N, 1, 28, 28] images and int64 labels of one split, after the cross-checks."""
    images, labels = arrays[image_spec], arrays[label_spec]
    if len(images) != len(labels):
        raise DataError(
            f"{files[label_spec]}: {len(labels)} labels for the {len(images)} images of "
            f"{files[image_spec]}; the files do not belong together"
        )
    if len(labels) and int(labels.max()) >= len(CLASS_NAMES):
        raise DataError(
            f"{files[label_spec]}: labels range {labels.min()}..{labels.max()}, outside "
            f"0..{len(CLASS_NAMES) - 1}; the file is corrupt or not Fashion-MNIST"
        )
    x = torch.from_numpy(images.copy()).unsqueeze(1)  # (N, 1, 28, 28); copy: a writable array
    return x, torch.from_numpy(labels.astype(np.int64))


SHIPPED_TEST = Path(__file__).parent.parent / "assets" / "fashion-mnist-test-1000.npz"


def shipped_test_photos() -> tuple[torch.Tensor, torch.Tensor]:
    """The first 1,000 official test photos, shipped in the package (assets/README.md):
    uint8 [1000, 1, 28, 28] and int64 labels."""
    with np.load(SHIPPED_TEST, allow_pickle=False) as f:
        images, labels = f["images"], f["labels"]
    return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def to_reference_input(images: torch.Tensor) -> torch.Tensor:
    """Grey [N, 1, 28, 28] -> [N, 3, 32, 32]: 2 black pixels each side, the plane thrice."""
    return F.pad(images, (2, 2, 2, 2)).repeat(1, 3, 1, 1)


def load_fashion_mnist(
    data_path: str | Path | None = None,
    *,
    channels: int = 3,
    md5: str | None = None,
    verify: bool = True,
    download: bool = True,
    progress: bool = True,
) -> ImageData:
    """Fashion-MNIST as uint8 [N, 1, 28, 28] (channels=1) or padded RGB [N, 3, 32, 32]."""
    if channels not in (1, 3):
        raise ConfigError(
            f"{NAME} comes as 1 channel (28x28) or 3 (padded to 32x32), not {channels}"
        )
    if md5 is not None:
        raise ConfigError(
            f"--md5 applies to CIFAR archives; {NAME} files are checked by the sha256 of their "
            "contents (--no-verify skips it for files of your own)"
        )
    files = locate(data_path, fetch=download, verify=verify, progress=progress)
    log.info("loading %s from %s", NAME, files[TRAIN_IMAGES].parent)
    arrays = _read(files, verify)
    train_x, train_y = _pair(arrays, files, TRAIN_IMAGES, TRAIN_LABELS)
    test_x, test_y = _pair(arrays, files, TEST_IMAGES, TEST_LABELS)
    if channels == 3:
        train_x, test_x = to_reference_input(train_x), to_reference_input(test_x)
    log.info("%s: %d train and %d test images, 10 classes", NAME, len(train_y), len(test_y))
    return ImageData(NAME, list(CLASS_NAMES), train_x, train_y, test_x, test_y)
