"""Atomic file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from eanet.choices import WEIGHTS
from eanet.errors import CheckpointError, ConfigError, EANetError

log = logging.getLogger(__name__)


def _umask() -> int:
    """The process's umask, read without changing it where Linux tells it (threads may be
    creating files meanwhile); elsewhere set and restored at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status", encoding="ascii") as f:
            line = next(x for x in f if x.startswith("Umask:"))
        return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a written file (or a directory's entries) to the disk: a crash after the rename
    finds the new data under the name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        # a file system without fsync; a directory that cannot be synced
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def _discard(tmp: Path) -> None:
    """Delete a temporary file after a failure; a failure to delete it is only a warning,
    never an error that hides the one that made the write fail."""
    try:
        tmp.unlink(missing_ok=True)
    except OSError as exc:
        log.warning("cannot remove the temporary file %s: %s", tmp, exc.strerror or exc)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it over `path`, else delete it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
    except OSError as exc:
        raise EANetError(
            f"cannot write {path}: {exc.strerror or exc}; "
            "check the directory exists and is writable"
        ) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)  # the data reach the disk before the rename makes them the file
        os.replace(tmp_path, path)
    except OSError as exc:
        _discard(tmp_path)
        raise EANetError(
            f"cannot write {path}: {exc.strerror or exc}; check free disk space and permissions"
        ) from exc
    except BaseException:
        _discard(tmp_path)
        raise
    try:
        _fsync(path.parent)  # the rename itself reaches the disk
    except OSError as exc:
        log.warning("cannot flush the directory %s: %s", path.parent, exc.strerror or exc)


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success rename it to `path` (absent or
    an empty directory), else delete it: a reader never sees half of the files."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    except OSError as exc:
        raise EANetError(
            f"cannot write {path}: {exc.strerror or exc}; check the directory"
        ) from exc
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError):
            raise EANetError(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise


def check_output(
    path: str | Path, *, overwrite: bool = False, inputs: Iterable[str | Path] = ()
) -> Path:
    """Refuse to write `path` over one of `inputs` (even with `overwrite`), over a directory,
    or over an existing file unless `overwrite`; one line naming it and what to do."""
    path = Path(path)
    for source in inputs:
        if _same_file(path, Path(source)):
            raise EANetError(
                f"{path} is the input {source}; writing it would destroy what is being read: "
                "choose another output"
            )
    if path.is_dir():
        raise EANetError(f"{path} is a directory; name a file to write")
    if (path.exists() or path.is_symlink()) and not overwrite:
        raise EANetError(f"{path} exists; pass --overwrite to replace it, or choose another")
    return path


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file (links and `..` resolved; a hard link too)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and a.samefile(b))
    except OSError:
        return False


def write_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (with the umask's permissions, no other temp file)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, obj: object) -> None:
    """Write `obj` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | Path) -> dict:
    """Read a JSON object; a missing or corrupt file is a one-line error naming it."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise EANetError(f"{path} not found") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EANetError(f"{path} is not readable JSON ({exc}); restore or delete it") from exc
    if not isinstance(data, dict):
        raise EANetError(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data


def write_csv(path: str | Path, rows: list[dict]) -> None:
    """Write a list of dicts (same keys) as CSV, atomically."""
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    write_text(path, buf.getvalue())


def remove_stale_temp_files(out: Path, names: Iterable[str]) -> list[Path]:
    """Delete `.NAME.*.tmp` files that a killed writer left beside the files `names`."""
    if not out.is_dir():
        return []
    removed = []
    for name in names:
        for tmp in out.glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
            except OSError as exc:
                log.warning("cannot remove stale temporary file %s: %s", tmp, exc)
                continue
            removed.append(tmp)
    if removed:
        log.info(
            "removed %d temporary file(s) left by an interrupted write: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


CHECKPOINT_NAME = "checkpoint.safetensors"
BEST_NAME = "best.safetensors"  # the weights of the best validation top-1, beside the last
ASSETS = Path(__file__).parent / "assets"
# Trained models shipped in the package: a name that stands for its checkpoint wherever a
# run or checkpoint is asked for (`eanet predict NAME ...`, `eanet.load(NAME)`).
SHIPPED_MODELS = {"eanet-fashion-mnist": ASSETS / "eanet-fashion-mnist.safetensors"}


def shipped_model(path: str | Path) -> Path | None:
    """The packaged checkpoint that `path` names (a shipped model's name that is not also a
    file or folder here), else None."""
    name = str(path)
    if name in SHIPPED_MODELS and not Path(name).exists():
        return SHIPPED_MODELS[name]
    return None


def resolve(path: str | Path, weights: str = "last") -> Path:
    """A run directory, a checkpoint file or a shipped model's name -> the checkpoint file
    (`best`: best.safetensors).

    Torch-free, so that the command line checks a checkpoint argument before torch loads."""
    if weights not in WEIGHTS:
        raise ConfigError(f"--weights {weights!r} must be one of {', '.join(WEIGHTS)}")
    shipped = shipped_model(path)
    if shipped is not None:
        if weights == "best":
            raise ConfigError(
                f"{path} is a shipped model with one set of weights; use --weights last"
            )
        return shipped
    path = Path(path)
    if weights == "best":
        run = path if path.is_dir() else path.parent
        if not (run / BEST_NAME).is_file():
            raise CheckpointError(
                f"{run}: no {BEST_NAME} there (written by `eanet train` when a run has "
                "validation images); use --weights last"
            )
        return run / BEST_NAME
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no checkpoint there; pass a run directory written by "
            "`eanet train` or a .safetensors checkpoint"
        )
    return path
