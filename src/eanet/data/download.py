"""Downloading an archive: cache directory, progress, md5 check, atomic write, offline errors."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

from tqdm import tqdm

from eanet.errors import DataError, one_line

log = logging.getLogger(__name__)

_TIMEOUT_S = 60.0


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
        raise DataError(
            f"{path}: cannot read it ({one_line(exc, with_type=True)}); check the path"
        ) from exc
    return digest.hexdigest()


def download(url: str, dest: Path, md5: str | None, progress: bool = True) -> Path:
    """Download url to dest atomically, checking md5 while streaming; returns dest."""
    dest = Path(dest)
    hint = f"download it by hand from {url} and put it at {dest} (or pass --data-path)"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=dest.name + ".", suffix=".part", dir=dest.parent)
    except OSError as exc:
        raise DataError(
            f"{dest.parent}: cannot write there ({one_line(exc, with_type=True)}); {hint}"
        ) from exc
    tmp = Path(tmp_name)
    log.info("downloading %s to %s", url, dest)
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
        raise DataError(f"cannot download {url} ({one_line(exc, with_type=True)}); {hint}") from exc
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
