"""CIFAR-10/100 loading: download, checksum, safe unpickling and conversion to uint8 tensors."""

from __future__ import annotations

import codecs
import functools
import hashlib
import http.client
import importlib
import logging
import lzma
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from tqdm import tqdm

from eanet.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SAMPLE_ARCHIVE: Path = Path(__file__).parent / "assets" / "cifar-100-sample.tar.gz"
SAMPLE_MD5 = "ee5a009b7f403c1b1b7c43ba2cd8b9c1"

_IMAGE_BYTES = 3 * 32 * 32
_TIMEOUT_S = 60.0
# Errors that a truncated or corrupt gzip/tar/pickle stream can raise while being read.
_CORRUPT = (
    pickle.UnpicklingError,
    EOFError,
    zlib.error,
    tarfile.TarError,
    OSError,
    ValueError,
    TypeError,
    AttributeError,
    LookupError,  # IndexError, KeyError, an unknown codec name
    MemoryError,
    ArithmeticError,  # OverflowError: a damaged length field
    RuntimeError,  # RecursionError
    SystemError,  # CPython's unpickler on some damaged opcode sequences
    lzma.LZMAError,
)


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR archive lives and how its python-pickle members are laid out."""

    name: str
    url: str
    filename: str
    md5: str
    folder: str
    train_members: tuple[str, ...]
    test_members: tuple[str, ...]
    meta_member: str
    label_key: str
    names_key: str
    num_classes: int

    @property
    def members(self) -> tuple[str, ...]:
        """All member files the loader needs, in archive order."""
        return (*self.train_members, *self.test_members, self.meta_member)


CIFAR100 = CifarSpec(
    name="cifar100",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    filename="cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    folder="cifar-100-python",
    train_members=("train",),
    test_members=("test",),
    meta_member="meta",
    label_key="fine_labels",
    names_key="fine_label_names",
    num_classes=100,
)
CIFAR10 = CifarSpec(
    name="cifar10",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    filename="cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    folder="cifar-10-batches-py",
    train_members=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_members=("test_batch",),
    meta_member="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
)
DATASETS: dict[str, CifarSpec] = {CIFAR100.name: CIFAR100, CIFAR10.name: CIFAR10}


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


def _one_line(exc: BaseException) -> str:
    """An exception as `Type: message` squeezed onto one line."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# --------------------------------------------------------------------------- download / md5


def default_cache_dir() -> Path:
    """The download cache: $EANET_DATA if set, else ~/.cache/eanet."""
    env = os.environ.get("EANET_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eanet"


def md5sum(path: Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    digest = hashlib.md5()
    try:
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
    except OSError as exc:
        raise DataError(f"{path}: cannot read it ({_one_line(exc)}); check the path") from exc
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str | None, progress: bool = True) -> Path:
    """Download url to dest atomically, checking md5 while streaming; returns dest."""
    dest = Path(dest)
    hint = f"download it by hand from {url} and put it at {dest} (or pass --data-path)"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise DataError(f"{dest.parent}: cannot write there ({_one_line(exc)}); {hint}") from exc
    tmp = Path(tmp_name)
    logger.info("downloading %s to %s", url, dest)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _stream(url, out, dest.name, progress)
        if md5 is not None and actual != md5.lower():
            raise DataError(
                f"{url}: downloaded md5 {actual} does not match the expected {md5}; "
                f"the download is corrupt: try again, or {hint}"
            )
        os.replace(tmp, dest)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        raise DataError(f"cannot download {url} ({_one_line(exc)}); {hint}") from exc
    finally:
        # Whatever happened (error, mismatch, Ctrl-C), never leave a partial file behind.
        tmp.unlink(missing_ok=True)
    return dest


def _stream(url: str, out: IO[bytes], label: str, progress: bool) -> str:
    """Copy url into out with a progress bar; return the md5 of what was written."""
    digest = hashlib.md5()
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=label,
            disable=not progress,
        ) as bar:
            while block := response.read(1 << 20):
                out.write(block)
                digest.update(block)
                received += len(block)
                bar.update(len(block))
    if total is not None and received != total:
        raise OSError(f"connection closed after {received} of {total} bytes")
    return digest.hexdigest()


def _check_md5(path: Path, expected: str, advice: str | None = None) -> None:
    """Raise DataError unless the file's md5 equals expected."""
    actual = md5sum(path)
    if actual == expected.lower().strip():
        return
    advice = advice or (
        f"if you trust this file pass its checksum with --md5 {actual} or use --no-verify"
    )
    raise DataError(f"{path}: md5 {actual} does not match the expected {expected}; {advice}")


# --------------------------------------------------------------------------- safe unpickling


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """`_codecs.encode` as Python 3 protocol-2 pickles use it for bytes, latin-1 only."""
    try:
        latin1 = codecs.lookup(encoding).name == "iso8859-1"
    except LookupError:  # a damaged or made-up codec name
        latin1 = False
    if not latin1:
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


@functools.cache
def _allowed_globals() -> dict[tuple[str, str], Any]:
    """The only callables a CIFAR pickle (or a re-pickled copy) may reference."""
    # numpy 2 renamed numpy.core to numpy._core; importing the old name warns, so take the new one.
    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
        numeric = importlib.import_module("numpy._core.numeric")
    except ImportError:
        multiarray = importlib.import_module("numpy.core.multiarray")
        numeric = importlib.import_module("numpy.core.numeric")
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    for core in ("numpy.core", "numpy._core"):
        table[(f"{core}.multiarray", "_reconstruct")] = multiarray._reconstruct
        table[(f"{core}.multiarray", "scalar")] = multiarray.scalar
        table[(f"{core}.numeric", "_frombuffer")] = numeric._frombuffer
    return table


class _RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and nothing that runs code."""

    def __init__(self, file: IO[bytes], where: str) -> None:
        super().__init__(file, encoding="latin1")
        self._where = where

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _allowed_globals()[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._where}: pickle refers to {module}.{name}, which a CIFAR file never does; "
                "refusing to load it"
            ) from None


def _unpickle(file: IO[bytes], where: str) -> Any:
    """Unpickle one CIFAR member safely; corrupt data becomes a DataError naming `where`."""
    try:
        return _RestrictedUnpickler(file, where).load()
    except _CORRUPT as exc:
        raise DataError(
            f"{where}: cannot unpickle it ({_one_line(exc)}); the file is truncated or corrupt: "
            "download it again"
        ) from exc


# --------------------------------------------------------------------------- reading members


@dataclass(frozen=True)
class _Source:
    path: Path
    archive: bool


def _read_archive(path: Path, spec: CifarSpec) -> dict[str, Any]:
    """Unpickle the needed members straight from the tar in one sequential pass."""
    wanted = {f"{spec.folder}/{m}": m for m in spec.members}
    found: dict[str, Any] = {}
    try:
        tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by the with below)
    except (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError) as exc:
        # tarfile's own message lists every compression it tried; the gist is enough here.
        raise DataError(
            f"{path}: not a tar.gz archive; it is truncated, corrupt or another kind of file: "
            f"download {spec.filename} again or point --data-path at the right file"
        ) from exc
    try:
        with tar:
            for member in tar:
                key = wanted.get(member.name.removeprefix("./"))
                if key is None or key in found:
                    continue
                where = f"{path} (member {member.name})"
                handle = tar.extractfile(member) if member.isfile() else None
                if handle is None:
                    raise DataError(
                        f"{where}: not a regular file; the archive is not {spec.filename}"
                    )
                with handle:
                    found[key] = _unpickle(handle, where)
    except (tarfile.TarError, EOFError, zlib.error, OSError, lzma.LZMAError) as exc:
        raise DataError(
            f"{path}: cannot read the archive ({_one_line(exc)}); it is truncated or corrupt: "
            f"download {spec.filename} again"
        ) from exc
    for name, key in wanted.items():
        if key not in found:
            raise DataError(
                f"{path}: archive has no member {name}; it is not the {spec.name} python archive "
                f"({spec.filename})"
            )
    return found


def _read_folder(folder: Path, spec: CifarSpec) -> dict[str, Any]:
    """Unpickle the needed members from an extracted CIFAR folder."""
    found: dict[str, Any] = {}
    for member in spec.members:
        path = folder / member
        if not path.is_file():
            raise DataError(
                f"{path}: missing; an extracted {spec.name} folder must contain "
                f"{', '.join(spec.members)}"
            )
        try:
            with open(path, "rb") as f:
                found[member] = _unpickle(f, str(path))
        except OSError as exc:
            raise DataError(f"{path}: cannot read it ({_one_line(exc)}); check it") from exc
    return found


# --------------------------------------------------------------------------- validation


def _str_keys(obj: Any, where: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """Check obj is a dict holding keys; bytes keys (encoding='bytes' style) are accepted."""
    if not isinstance(obj, dict):
        raise DataError(
            f"{where}: holds a {type(obj).__name__}, not a dict with {', '.join(keys)}; "
            "it is not a CIFAR python file"
        )
    out = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
    missing = [k for k in keys if k not in out]
    if missing:
        raise DataError(
            f"{where}: has no key {', '.join(map(repr, missing))}; it is not a CIFAR python file "
            "of the expected kind"
        )
    return out


def _check_batch(obj: Any, where: str, spec: CifarSpec) -> tuple[np.ndarray, np.ndarray]:
    """Validate one train/test batch; return (data [N, 3072] uint8, labels [N] int64)."""
    batch = _str_keys(obj, where, ("data", spec.label_key))
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        kind = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: 'data' is {kind}, not a uint8 [N, 3072] array; file is corrupt")
    if data.shape[1] != _IMAGE_BYTES:
        raise DataError(
            f"{where}: 'data' has shape {data.shape}, not [N, {_IMAGE_BYTES}] (3x32x32 images); "
            "the file is corrupt or not CIFAR"
        )
    try:
        labels = np.asarray(batch[spec.label_key])
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: '{spec.label_key}' is not a list of integers") from exc
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(
            f"{where}: '{spec.label_key}' is {labels.dtype} {labels.shape}, not a list of integers"
        )
    if len(labels) != len(data):
        raise DataError(
            f"{where}: {len(labels)} labels for {len(data)} images; the file is corrupt"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(
            f"{where}: labels range {labels.min()}..{labels.max()}, outside "
            f"0..{spec.num_classes - 1}; the file is corrupt or not {spec.name}"
        )
    return data, labels.astype(np.int64)


def _check_meta(obj: Any, where: str, spec: CifarSpec) -> list[str]:
    """Validate the meta member; return the class names."""
    names = _str_keys(obj, where, (spec.names_key,))[spec.names_key]
    if not isinstance(names, (list, tuple)) or len(names) != spec.num_classes:
        count = len(names) if isinstance(names, (list, tuple)) else type(names).__name__
        raise DataError(
            f"{where}: '{spec.names_key}' has {count} entries, not {spec.num_classes}; "
            f"it is not the {spec.name} meta file"
        )
    out = [n.decode("latin1") if isinstance(n, bytes) else n for n in names]
    if not all(isinstance(n, str) for n in out):
        raise DataError(f"{where}: '{spec.names_key}' holds non-text entries; the file is corrupt")
    return out


def _to_tensors(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack batches into uint8 [N, 3, 32, 32] images (channel planes, row-major) and labels."""
    data = np.concatenate([d for d, _ in parts]) if len(parts) > 1 else parts[0][0]
    labels = np.concatenate([lab for _, lab in parts])
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32))
    if not images.flags.writeable:  # torch warns on read-only numpy memory
        images = images.copy()
    return torch.from_numpy(images), torch.from_numpy(labels)


# --------------------------------------------------------------------------- resolution


def _from_cache(
    spec: CifarSpec, md5: str | None, verify: bool, fetch: bool, progress: bool
) -> Path:
    """The archive in the download cache, downloading it first if allowed."""
    path = default_cache_dir() / spec.filename
    if path.is_file():
        if verify:
            _check_md5(
                path,
                md5 or spec.md5,
                "the cached file is corrupt or incomplete: delete it and run again to download "
                "it afresh (or pass --data-path)",
            )
        return path
    if not fetch:
        raise DataError(
            f"{path}: not found and downloading is off; download {spec.url} by hand and put it "
            "there (or set EANET_DATA, or pass --data-path)"
        )
    return download(spec.url, path, (md5 or spec.md5) if verify else None, progress=progress)


def _resolve(
    spec: CifarSpec,
    data_path: str | Path | None,
    md5: str | None,
    verify: bool,
    fetch: bool,
    progress: bool,
) -> _Source:
    """Turn a user's data path (or None for the cache) into an archive or extracted folder."""
    if data_path is None:
        return _Source(_from_cache(spec, md5, verify, fetch, progress), archive=True)
    path = Path(data_path).expanduser()
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder; point --data-path at {spec.filename} "
            f"or its extracted folder {spec.folder}/"
        )
    if path.is_dir():
        if any((path / m).exists() for m in spec.members):
            return _trusted_folder(path, md5)
        if (path / spec.folder).is_dir():
            return _trusted_folder(path / spec.folder, md5)
        if (path / spec.filename).is_file():
            path = path / spec.filename
        else:
            raise DataError(
                f"{path}: holds neither {spec.filename} nor the extracted folder {spec.folder}/; "
                "point --data-path at one of them"
            )
    if verify:
        _check_md5(path, md5 or spec.md5)
    return _Source(path, archive=True)


def _trusted_folder(folder: Path, md5: str | None) -> _Source:
    """An extracted folder: explicit local data, nothing to checksum."""
    logger.info("%s: extracted folder given explicitly, trusted without a checksum", folder)
    if md5:
        logger.warning("%s: --md5 applies to archives only; ignored for a folder", folder)
    return _Source(folder, archive=False)


# --------------------------------------------------------------------------- public loaders


def _spec(name: str) -> CifarSpec:
    """The CIFAR spec for a data set name, or a DataError listing the choices."""
    try:
        return DATASETS[name]
    except KeyError:
        raise DataError(
            f"unknown data set {name!r}; choose one of: {', '.join(sorted(DATASETS))}"
        ) from None


def load_cifar(
    name: str,
    data_path: str | Path | None = None,
    *,
    md5: str | None = None,
    verify: bool = True,
    download: bool = True,
    progress: bool = True,
) -> ImageData:
    """Load CIFAR-10/100 from an archive, an extracted folder or the download cache."""
    spec = _spec(name)
    source = _resolve(spec, data_path, md5, verify, download, progress)
    logger.info("loading %s from %s", spec.name, source.path)
    reader: Callable[[Path, CifarSpec], dict[str, Any]]
    reader = _read_archive if source.archive else _read_folder
    members = reader(source.path, spec)

    def where(member: str) -> str:
        if source.archive:
            return f"{source.path} (member {spec.folder}/{member})"
        return str(source.path / member)

    class_names = _check_meta(members[spec.meta_member], where(spec.meta_member), spec)
    train = [_check_batch(members[m], where(m), spec) for m in spec.train_members]
    test = [_check_batch(members[m], where(m), spec) for m in spec.test_members]
    train_images, train_labels = _to_tensors(train)
    test_images, test_labels = _to_tensors(test)
    logger.info(
        "%s: %d train and %d test images, %d classes",
        spec.name,
        len(train_labels),
        len(test_labels),
        len(class_names),
    )
    return ImageData(spec.name, class_names, train_images, train_labels, test_images, test_labels)


DATASET_NAMES = (*DATASETS, "folder", "digits", "synthetic")


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


def load_dataset(
    name: str, data_path: str | Path | None = None, *, image_size: int | None = None, **kwargs: Any
) -> ImageData:
    """Load a data set by name (DATASET_NAMES); kwargs go to the specific loader.

    `image_size` is the side a folder's images are resized to (default 32); CIFAR is 32 only.
    """
    if name == "folder":
        from eanet.folders import load_folder  # folders imports this module

        return load_folder(data_path, image_size=image_size or 32, **kwargs)
    if name == "digits":  # scikit-learn's real 8x8 digits; md5/verify/progress do not apply
        from eanet.digits import load_digits  # digits imports this module

        return load_digits(data_path, image_size=image_size or 32)
    if name == "synthetic":  # random CIFAR-100-shaped data, only to time the recipe
        return synthetic_cifar()
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


def train_val_split(
    data: ImageData, fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training and validation tensors: the data set's own val split if any, else the tail."""
    if data.val_images is not None and data.val_labels is not None:
        return data.train_images, data.train_labels, data.val_images, data.val_labels
    return split_validation(data.train_images, data.train_labels, fraction)


# --------------------------------------------------------------------------- preprocessing helpers


def split_validation(
    images: torch.Tensor, labels: torch.Tensor, fraction: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split off the last int(N * fraction) samples as validation, like Keras validation_split."""
    if not 0.0 <= fraction < 1.0:  # also rejects NaN
        raise ConfigError(f"validation fraction must be in [0, 1), got {fraction}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    split = len(images) - int(len(images) * fraction)
    return images[:split], labels[:split], images[split:], labels[split:]


def compute_normalization(
    images: torch.Tensor, batch: int = 4096
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-channel mean and population variance in pixel space (0..255), plus the pixel count."""
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected uint8 [N, 3, H, W] images, got {images.dtype} {tuple(images.shape)}"
        )
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    count = images.shape[0] * images.shape[2] * images.shape[3]
    if count == 0:
        raise DataError("no images to compute the normalization from; the data set is empty")
    # Pixel values are integers, so float64 sums stay exact (255^2 * 5e7 pixels is far below
    # 2^53) and E[x^2] - E[x]^2 loses nothing; chunks keep the float copy small.
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    for start in range(0, images.shape[0], batch):
        chunk = images[start : start + batch].to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square_().sum(dim=(0, 2, 3))
    mean = total / count
    var = (squares / count - mean * mean).clamp_min(0.0)
    return mean.float(), var.float(), count
