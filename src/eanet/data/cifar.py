"""CIFAR-10/100 archives: their layout, safe unpickling and conversion to uint8 tensors."""

from __future__ import annotations

import codecs
import contextlib
import functools
import importlib
import logging
import lzma
import pickle
import tarfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from eanet.data.dataset import ImageData
from eanet.data.download import _check_md5, default_cache_dir, download
from eanet.errors import DataError, one_line

log = logging.getLogger(__name__)


SAMPLE_ARCHIVE: Path = Path(__file__).parent.parent / "assets" / "cifar-100-sample.tar.gz"


SAMPLE_MD5 = "ee5a009b7f403c1b1b7c43ba2cd8b9c1"


_IMAGE_BYTES = 3 * 32 * 32


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
            f"{where}: cannot unpickle it ({one_line(exc, with_type=True)}); "
            "the file is truncated or corrupt: "
            "download it again"
        ) from exc


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
            f"{path}: cannot read the archive ({one_line(exc, with_type=True)}); "
            "it is truncated or corrupt: "
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
            raise DataError(_not_a_cifar_folder(folder, member, spec))
        try:
            with open(path, "rb") as f:
                found[member] = _unpickle(f, str(path))
        except OSError as exc:
            raise DataError(
                f"{path}: cannot read it ({one_line(exc, with_type=True)}); check it"
            ) from exc
    return found


def _not_a_cifar_folder(folder: Path, member: str, spec: CifarSpec) -> str:
    """Why `folder` is not an extracted CIFAR folder (it names the members it lacks)."""
    path = folder / member
    if path.is_dir():
        what = f"{path} is a folder, not the {spec.name} file {member}"
    else:
        what = f"{path}: missing"
    files = ", ".join(spec.members)
    return f"{what}; an extracted {spec.name} folder holds the files {files}" + _image_folder_hint(
        folder
    )


def _image_folder_hint(folder: Path) -> str:
    """For a folder holding folders (class folders, or train/ and test/ of them): the flag
    that reads one."""
    with contextlib.suppress(OSError):
        if any(p.is_dir() for p in folder.iterdir()):
            return (
                "; for a folder of your own images, one subfolder per class, add --dataset folder"
            )
    return ""


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
                "point --data-path at one of them" + _image_folder_hint(path)
            )
    if verify:
        _check_md5(path, md5 or spec.md5)
    return _Source(path, archive=True)


def _trusted_folder(folder: Path, md5: str | None) -> _Source:
    """An extracted folder: explicit local data, nothing to checksum."""
    log.info("%s: extracted folder given explicitly, trusted without a checksum", folder)
    if md5:
        log.warning("%s: --md5 applies to archives only; ignored for a folder", folder)
    return _Source(folder, archive=False)


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
    log.info("loading %s from %s", spec.name, source.path)
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
    log.info(
        "%s: %d train and %d test images, %d classes",
        spec.name,
        len(train_labels),
        len(test_labels),
        len(class_names),
    )
    return ImageData(spec.name, class_names, train_images, train_labels, test_images, test_labels)
