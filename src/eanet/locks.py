"""A PID lock file: one process at a time in a directory; a lock of a dead process is taken over.

The lock is a file holding the owner's process id. Checking it and creating it happen under
an exclusive `flock` of the directory itself, so two processes that start at once cannot both
see "free" (or both take over the same stale lock), and a reader never sees a lock file whose
id is not written yet. The flock is held only for that moment; the PID file is what marks
the directory as in use, for as long as the owner runs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from eanet.errors import EANetError

try:
    import fcntl
except ImportError:  # not on Windows: the PID file alone (a narrow race at start-up)
    fcntl = None  # type: ignore[assignment]

RUN_LOCK = ".run.lock"
COMPARE_LOCK = ".compare.lock"


def _holder(lock: Path) -> int | None:
    """The id of the live process that holds `lock`, or None if it is free or stale."""
    try:
        pid = int(lock.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)  # signal 0: only checks that the process exists
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # it exists, under another user
    return pid


@contextlib.contextmanager
def _guard(directory: Path) -> Iterator[None]:
    """An exclusive flock of `directory` while a lock in it is checked and taken."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the flock


def _take(out: Path, lock: Path, what: str) -> None:
    """Create `lock` with this process's id, or refuse while a live process holds it."""
    with _guard(out):
        pid = _holder(lock)
        if pid is not None:
            raise EANetError(
                f"{out}: {what} in use by PID {pid} (lock {lock.name}); wait for it to "
                f"finish or choose another --out (delete {lock} only if PID {pid} is not eanet)"
            )
        lock.unlink(missing_ok=True)  # left by a process that was killed
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        try:
            os.write(fd, str(os.getpid()).encode())
        finally:
            os.close(fd)


@contextlib.contextmanager
def directory_lock(out: Path, name: str = RUN_LOCK, what: str = "run directory") -> Iterator[None]:
    """Hold OUT/NAME (with this pid) so that two eanet processes never share a directory.

    A second process gets a one-line EANetError "OUT: run directory in use by PID N ...";
    a lock left by a process that no longer runs is taken over.
    """
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = out / name
        _take(out, lock, what)
    except OSError as exc:
        raise EANetError(
            f"cannot write to {what} {out}: {exc.strerror or exc} (taking its lock {name}); "
            "check the path and its permissions"
        ) from exc
    try:
        yield
    finally:
        if _holder(lock) == os.getpid():  # never remove a lock another process took over
            lock.unlink(missing_ok=True)
