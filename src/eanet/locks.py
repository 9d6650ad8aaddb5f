"""A PID lock file: one process at a time in a directory; a lock of a dead process is taken over."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from eanet.errors import EANetError


def _pid_alive(lock: Path) -> bool:
    """Whether the process whose id the lock file holds still runs."""
    try:
        pid = int(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


@contextlib.contextmanager
def directory_lock(out: Path) -> Iterator[None]:
    """Hold OUT/.compare.lock (with this pid) so that two compares never share a directory."""
    out.mkdir(parents=True, exist_ok=True)
    lock = out / ".compare.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            if not _pid_alive(lock):
                lock.unlink(missing_ok=True)  # left by a compare that was killed
                continue
            raise EANetError(
                f"{out} is in use by another eanet compare ({lock}); wait for it to "
                "finish or choose another --out"
            ) from None
    else:
        raise EANetError(f"{out}: cannot take {lock}; delete it if no compare is running")
    try:
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        yield
    finally:
        lock.unlink(missing_ok=True)
