"""Hand-written CPU kernels (`kernels/*.c`), compiled for this machine at first use.

Where torch's own kernels make several passes over a batch through memory, a kernel here
works through one batch element at a time inside the core's cache. The C source is
compiled with the system's C compiler (`$CC`, which may carry arguments, else `cc`) with
`-O3 -march=native` into `$EANET_KERNELS` (default `$XDG_CACHE_HOME/eanet/kernels`, else
`~/.cache/eanet/kernels`, else `eanet-kernels-<uid>` in the temporary directory), under a
name that hashes the source, the compiler and the CPU (the machine under a home directory
can change), and loaded with ctypes; the ctypes signatures are read from the C prototypes.

Loading a library runs its code, so the cache is owned as Inductor owns its own: the
directory is created 0700 and used only while it belongs to this user, no one else can
write to it, and no one else can rename it or anything above it (every directory on the way
is root's or this user's, and writable by others only where sticky, as /tmp is). Each
library is written 0755 beside the sha256 of its bytes, opened once, checked on the bytes
read from that open file (this user's, matching: a truncated library would kill the process
with a bus error) and loaded through it, /proc/self/fd/N, never by its name again; else it
is rebuilt. What is built is checked and loaded without a lock; compiling happens under a
lock in the directory, waited for LOCK_TIMEOUT seconds at most, with a time limit, and a
compile that fails or hangs leaves a marker, so that later runs do not try it again until
the source, compiler or CPU changes. Where there is no compiler, the directory is not
private, the lock is held too long or a compile fails, `library` returns None after one
warning (and compiles nothing more in this process), and the callers run their torch
equivalents.

The kernels take raw pointers and a range of the batch; `split_batch` runs the ranges on
torch's number of threads (ctypes releases the GIL during the call).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from eanet.accel.upstream import mapped_libraries
from eanet.errors import one_line
from eanet.runtime import cpu_info

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent / "kernels"
KERNELS = ("double_normalize", "gelu", "layer_norm", "dropout", "softmax")
FLAGS = (
    "-O3",
    "-march=native",
    "-mprefer-vector-width=512",
    "-shared",
    "-fPIC",
    "-fopenmp-simd",
    "-fno-trapping-math",  # FP exception flags unused: the selects in exp vectorise for AVX2
    "-lm",
)
OPENMP_RUNTIMES = ("libgomp",)  # what gcc's -fopenmp code calls (GOMP_parallel, ...)
ENABLED = {"native": True}  # one switch (tests turn the kernels off to run torch's ops)
COMPILE_TIMEOUT = 60  # seconds per kernel (each normally takes a few seconds)
LOCK_TIMEOUT = 30  # seconds to wait for another process's compile, then torch's ops
VERSION_TIMEOUT = 10  # seconds for `$CC --version`

# The C types of the kernels' interface, by the C spelling (any pointer is a void pointer).
_CTYPES = {
    "int": ctypes.c_int,
    "long": ctypes.c_long,
    "uint32_t": ctypes.c_uint32,
    "float": ctypes.c_float,
    "void": None,
}
# An exported function's definition: `int name(params) {` at the start of a line, not static.
_EXPORTED = re.compile(r"^(?!static\b)(\w+)\s+(\w+)\s*\(([^)]*)\)\s*\{", re.MULTILINE)
_INCLUDE = re.compile(r'^#include\s+"([^"]+)"', re.MULTILINE)
# The names of _new_file's temporary files, ".<kernel>-<key>.so.<random>.tmp" and the like:
# the only files of the cache directory that are ever deleted.
_TEMPORARY = re.compile(r"\.\w+-[0-9a-f]{16}\.(?:so|so\.sha256|failed)\.\w+\.tmp")
_LOADED: list[int] = []  # the open files the libraries were loaded from (see _load)


def _ctype(decl: str, where: str):
    """The ctypes type of one C parameter or return type ('const float *R x' is a pointer)."""
    if "*" in decl or "[" in decl:
        return ctypes.c_void_p
    words = [w for w in decl.split() if w != "const"]
    if not 1 <= len(words) <= 2 or words[0] not in _CTYPES:
        raise ValueError(f"{where}: no ctypes type for {decl.strip()!r}; add it to native._CTYPES")
    return _CTYPES[words[0]]


@functools.cache
def signatures(name: str) -> dict[str, tuple[list, object]]:
    """{function: (argtypes, restype)} of what kernels/<name>.c and the headers it includes
    export, read from their C prototypes: the interface is declared once, in C."""
    table, files = {}, [SOURCES / f"{name}.c"]
    for path in files:  # grows with the local headers (#include "...") as they are read
        text = path.read_text(encoding="utf-8")
        files += [SOURCES / h for h in _INCLUDE.findall(text) if SOURCES / h not in files]
        for restype, fn, params in _EXPORTED.findall(text):
            where = f"{path.name}: {fn}"
            decls = [] if params.strip() in ("", "void") else params.split(",")
            table[fn] = ([_ctype(d, where) for d in decls], _ctype(restype, where))
    return table


def cache_dir() -> Path | None:
    """The kernel cache, an absolute path: $EANET_KERNELS, else $XDG_CACHE_HOME/eanet/kernels,
    else ~/.cache/eanet/kernels, else (no home directory) eanet-kernels-<uid> in the temporary
    directory; None where none can be named ($EANET_KERNELS with a `~` and no home)."""
    try:
        env = os.environ.get("EANET_KERNELS")
        if env:  # made absolute: a bare library name would send dlopen down the search path
            path = os.path.expanduser(env)
            return None if path.startswith("~") else Path(os.path.abspath(path))
        xdg, home = os.environ.get("XDG_CACHE_HOME", ""), os.path.expanduser("~")
        if os.path.isabs(xdg):
            return Path(xdg) / "eanet" / "kernels"
        if os.path.isabs(home):
            return Path(home) / ".cache" / "eanet" / "kernels"
        return Path(tempfile.gettempdir()) / f"eanet-kernels-{os.geteuid()}"
    except OSError:  # the working directory is gone; no usable temporary directory
        return None


def _run(argv: list[str], timeout: float, what: str) -> str:
    """The output of a compiler command; RuntimeError naming `what` where it fails or outlives
    `timeout` seconds (then it is killed with everything it started: cc1, as, ld, ccache's
    gcc; its own session, so that the pipes close, is why Ctrl-C is passed on by hand)."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
    except BaseException as exc:  # the time limit, or Ctrl-C (the new session misses SIGINT)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        if isinstance(exc, subprocess.TimeoutExpired):
            raise RuntimeError(f"{what} did not finish within {timeout:g} s") from None
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {proc.returncode}): {one_line(out)[:500]}")
    return out


@dataclass
class _Cache:
    """This process's compiler and private cache directory, and what happened in it."""

    cc: list[str]
    directory: Path
    compiler_id: str
    failed: bool = False  # a build or load failed: nothing more is compiled
    announced: bool = False  # the one "compiling" line has been logged


def _open_dir(parent: int, name: str, mode: int) -> int:
    """A handle (O_PATH) of the directory `name` in the directory `parent`, created with `mode`
    where missing; OSError where it is a symlink or not a directory."""
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        return os.open(name, flags, dir_fd=parent)
    except FileNotFoundError:
        with contextlib.suppress(FileExistsError):  # made by another process meanwhile
            os.mkdir(name, mode, dir_fd=parent)
        return os.open(name, flags, dir_fd=parent)


def _private_dir(directory: Path) -> str | None:
    """None where no other user can change `directory` (absolute, no symlinks) or what is in
    it, else why not.

    It is this user's and writable by no one else (created 0700 where missing, its missing
    parents 0755 at most, whatever the umask); every directory above it is root's or this
    user's and writable by no one else, or else sticky, as /tmp is (there no one else can
    rename what is root's or this user's). A user who can write to a directory on the way can
    swap what is below it for their own between any check and any use. The walk opens each
    step inside the last without following symlinks, so that nothing on the way redirects it.
    """
    uid, here = os.geteuid(), Path("/")
    fd = os.open(here, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in [*directory.parts[1:], None]:
            st, last = os.fstat(fd), part is None
            if st.st_uid != uid and (last or st.st_uid != 0):
                return f"{here} belongs to another user (uid {st.st_uid})"
            if st.st_mode & 0o022 and (last or not st.st_mode & stat.S_ISVTX):
                return f"{here} is writable by others (mode {stat.filemode(st.st_mode)})"
            if last:
                return None
            here = here / part
            child = _open_dir(fd, part, 0o700 if here == directory else 0o755)
            os.close(fd)
            fd = child
    except OSError as exc:
        return f"cannot open or create {here} ({exc.strerror or exc})"
    finally:
        os.close(fd)


@functools.cache
def _setup(cc: str, directory: Path | None) -> _Cache | None:
    """The compiler and cache directory, or None after one warning saying what to change."""
    argv = []
    with contextlib.suppress(ValueError):  # unbalanced quotes: no compiler
        argv = shlex.split(cc)
    if platform.system() != "Linux" or not os.path.isdir("/proc/self/fd"):
        log.warning("the native kernels are built for Linux (with /proc) only: running torch's ops")
        return None
    if not argv or shutil.which(argv[0]) is None:
        log.warning(
            "no C compiler (%s) found: the native kernels are off, running torch's ops "
            "(install gcc, or set CC to a C compiler)",
            cc,
        )
        return None
    if directory is None:
        log.warning(
            "the native kernels are off, running torch's ops: no directory can be named for "
            "their cache (no home directory?); set EANET_KERNELS to a directory of your own"
        )
        return None
    directory = Path(os.path.realpath(directory))  # the directory that the checks are about
    problem = _private_dir(directory)
    if problem:
        log.warning(
            "the native kernels are off, running torch's ops: %s; keep them in a directory of "
            "your own that only you can write to (chmod 700), below directories that only you "
            "or root can change (or sticky ones, as /tmp), and set EANET_KERNELS to it",
            problem,
        )
        return None
    try:
        compiler_id = (
            _run([*argv, "--version"], VERSION_TIMEOUT, f"{cc} --version").partition("\n")[0] or cc
        )
    except (OSError, RuntimeError) as exc:
        log.warning("the native kernels are off, running torch's ops: %s", one_line(exc))
        return None
    return _Cache(argv, directory, compiler_id)


def openmp_runtime() -> str | None:
    """The path of the OpenMP runtime torch runs on, where it is gcc's (libgomp), else None.

    Kernels built with -fopenmp against it share torch's threads; against a second runtime
    they would spin beside torch's threads (the kernel then takes about twice as long). Other
    packages bring their own libgomp (scikit-learn's wheels do): torch's is the one in its
    own lib directory, or else the only one loaded.
    """
    if "OpenMP" not in torch.__config__.parallel_info():
        return None
    found = sorted(p for p in mapped_libraries() if os.path.basename(p).startswith(OPENMP_RUNTIMES))
    torch_lib = str(Path(torch.__file__).resolve().parent / "lib")
    own = [p for p in found if str(Path(p).resolve().parent) == torch_lib]
    if own or len(found) == 1:
        return (own or found)[0]
    return None


def _flags() -> list[str]:
    flags = [*FLAGS]
    runtime = openmp_runtime()
    if runtime:  # link the runtime torch has loaded, and find it again at load time
        flags += ["-fopenmp", runtime, f"-Wl,-rpath,{Path(runtime).parent}"]
    return flags


def _target(name: str, cache: _Cache, flags: list[str]) -> Path:
    """Where the library of kernels/<name>.c for this source, compiler, flags and CPU lives."""
    source = b"".join(p.read_bytes() for p in [SOURCES / f"{name}.c", *sorted(SOURCES.glob("*.h"))])
    model, cpu_flags = cpu_info()
    key = [source, cache.compiler_id.encode(), " ".join(flags).encode()]
    key += [str(model).encode(), " ".join(cpu_flags).encode(), platform.machine().encode()]
    digest = hashlib.sha256(b"\0".join(key)).hexdigest()[:16]
    return cache.directory / f"{name}-{digest}.so"


def _sha256_path(library: Path) -> Path:
    return library.with_name(library.name + ".sha256")


def _own_bytes(fd: int, path: Path) -> bytes:
    """The bytes of the file open at `fd` (named `path`): a regular file of this user's that no
    one else can write; ValueError where it is not that."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ValueError(f"{path} is not a file of this user's that only they can write")
    with open(fd, "rb", closefd=False) as f:
        return f.read()


def _read_own(path: Path) -> bytes:
    """The bytes of `path`, a regular file of this user's that no one else can write;
    OSError (ValueError for a wrong owner or mode) where it is not that."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return _own_bytes(fd, path)
    finally:
        os.close(fd)


def _open_checked(library: Path, digest: str | None = None) -> int:
    """`library` opened, a file of this user's that only they can write whose bytes, as read
    from that open file, have the sha256 `digest` (by default the one recorded beside it).
    FileNotFoundError where it is missing; OSError or ValueError saying why where it is not
    usable (truncated: loading it was a bus error; replaced; a crash mid-write; a symlink)."""
    fd = os.open(library, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        data = _own_bytes(fd, library)
        if digest is None:
            try:
                digest = _read_own(_sha256_path(library)).decode("ascii").strip()
            except FileNotFoundError:
                raise ValueError(f"no sha256 is recorded beside {library}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"{library} does not match its recorded sha256 (damaged or replaced)")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _usable(library: Path) -> tuple[int | None, str | None]:
    """(`library` opened and checked, None), else (None, why it is not usable: None where it is
    simply not built yet)."""
    try:
        return _open_checked(library), None
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, one_line(exc)


def _load(fd: int, name: str) -> ctypes.CDLL:
    """The library open at `fd` loaded through /proc/self/fd: the very file that was checked,
    whatever has been renamed over its name since (a name would be opened anew by dlopen).

    The file stays open for the life of the process: the dynamic loader knows a library by
    the name it was loaded by, and would take another at a reused /proc/self/fd/N for it."""
    try:
        lib = ctypes.CDLL(f"/proc/self/fd/{fd}")
    except BaseException:
        os.close(fd)
        raise
    _LOADED.append(fd)
    for fn, (argtypes, restype) in signatures(name).items():
        getattr(lib, fn).argtypes = argtypes
        getattr(lib, fn).restype = restype
    return lib


def _wait(fd: int, lock: Path) -> bool:
    """Whether the flock of `fd` (on `lock`) was had within LOCK_TIMEOUT seconds."""
    deadline, said = time.monotonic() + LOCK_TIMEOUT, False
    while True:
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        if time.monotonic() >= deadline:
            return False
        if not said:
            log.info("waiting for %s: another process is compiling native kernels", lock)
            said = True
        time.sleep(0.05)


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[bool]:
    """Hold the cache's lock (one process at a time cleans and compiles): False where another
    process held it LOCK_TIMEOUT seconds (a compile that hangs, a process stopped with it)."""
    lock = directory / ".lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        yield _wait(fd, lock)
    finally:
        os.close(fd)


def _clean_temporaries(directory: Path) -> None:
    """Delete the temporary files of compiles that never finished (a SIGKILL, a power cut):
    under the lock no compile is running, so every one there is stale. Only files named as
    _new_file names them: $EANET_KERNELS may be a directory that holds the user's own."""
    with os.scandir(directory) as entries:
        stale = [
            e for e in entries if _TEMPORARY.fullmatch(e.name) and e.is_file(follow_symlinks=False)
        ]
    for tmp in stale:
        with contextlib.suppress(OSError):
            os.unlink(tmp.path)
            log.debug("removed the stale temporary file %s", tmp.path)


@contextlib.contextmanager
def _new_file(path: Path, mode: int) -> Iterator[Path]:
    """A temporary file beside `path`; on success given `mode` (whatever the umask) and
    renamed over `path`, else deleted."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _failed_before(name: str, marker: Path) -> bool:
    """Whether an earlier run failed to compile this library (`marker` says how): then one
    warning, and torch's ops until the source, compiler or CPU changes or it is deleted."""
    try:
        reason = _read_own(marker).decode("utf-8", "replace")
    except (OSError, ValueError):
        return False
    log.warning(
        "the native %s kernels are off, running torch's ops: compiling them failed in an "
        "earlier run (%s); delete %s to try again",
        name,
        one_line(reason)[:300],
        marker,
    )
    return True


def _compile(name: str, cache: _Cache, flags: list[str], target: Path) -> str:
    """Compile kernels/<name>.c into `target` (0755) and its sha256 beside it (0644); that
    sha256. Where the compiler fails, hangs or writes no library, a marker says so to later
    runs (_failed_before), which do not wait for it again."""
    if not cache.announced:
        log.info("compiling native kernels (first use) into %s", cache.directory)
        cache.announced = True
    what = f"{shlex.join(cache.cc)} {name}.c"
    try:
        with _new_file(target, 0o755) as tmp:
            _run(
                [*cache.cc, str(SOURCES / f"{name}.c"), *flags, "-o", str(tmp)],
                COMPILE_TIMEOUT,
                what,
            )
            data = tmp.read_bytes()
            if not data.startswith(b"\x7fELF"):
                raise RuntimeError(f"{what} exited 0 but wrote no shared library")
            digest = hashlib.sha256(data).hexdigest()
            with _new_file(_sha256_path(target), 0o644) as record:
                record.write_text(digest + "\n", encoding="ascii")
    except RuntimeError as exc:
        marker = _marker(target)
        with contextlib.suppress(OSError), _new_file(marker, 0o644) as note:
            note.write_text(one_line(exc) + "\n", encoding="utf-8")
        raise RuntimeError(f"{one_line(exc)} (not tried again until {marker} is deleted)") from None
    log.debug("compiled the %s kernels into %s", name, target)
    return digest


def _marker(library: Path) -> Path:
    return library.with_suffix(".failed")


def _build(name: str, cache: _Cache) -> int | None:
    """The library of kernels/<name>.c opened and checked, compiled first where missing or
    damaged; None (said why) where it cannot be had now. What is built is checked without
    the lock: a process only waits for it where it compiles."""
    flags = _flags()
    target = _target(name, cache, flags)
    fd, _ = _usable(target)
    if fd is not None:
        return fd
    if cache.failed:
        log.debug("not compiling the %s kernels after an earlier failure", name)
        return None
    if _failed_before(name, _marker(target)):
        cache.failed = True
        return None
    with _locked(cache.directory) as held:
        if not held:
            cache.failed = True
            log.warning(
                "the native kernels are off, running torch's ops: another process has held "
                "%s for %g s (a compile that hangs?); they are tried again in the next run",
                cache.directory / ".lock",
                LOCK_TIMEOUT,
            )
            return None
        fd, problem = _usable(target)  # built by another process while this one waited
        if fd is not None:
            return fd
        if _failed_before(name, _marker(target)):  # or failed to
            cache.failed = True
            return None
        if problem:
            log.warning("the cached native kernels are not loaded: %s; rebuilding them", problem)
        _clean_temporaries(cache.directory)
        return _open_checked(target, _compile(name, cache, flags, target))


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The loaded kernels of kernels/<name>.c, or None (one warning) where they cannot be had."""
    cache = _setup(os.environ.get("CC") or "cc", cache_dir())
    if cache is None:
        return None
    try:
        fd = _build(name, cache)
        return None if fd is None else _load(fd, name)
    except Exception as exc:  # a compiler error, an unwritable cache, a bad library
        cache.failed = True
        log.warning(
            "the native %s kernels are off, running torch's ops, and no more are compiled "
            "in this process: %s",
            name,
            one_line(exc, with_type=True),
        )
        return None


@torch.compiler.assume_constant_result  # torch.compile asks once, at tracing, not per call
def available(name: str) -> bool:
    return ENABLED["native"] and library(name) is not None


def status() -> dict:
    """Which kernels run here, and whether on OpenMP threads (for `eanet bench` and reports)."""
    libs = {name: library(name) if ENABLED["native"] else None for name in KERNELS}
    on = [name for name, lib in libs.items() if lib is not None]
    return {"on": on, "openmp": bool(on) and bool(libs[on[0]].kernels_threaded())}


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="eanet-kernel")


def split_batch(lib: ctypes.CDLL, fn, batch: int, *args) -> None:
    """fn(*args, b0, b1) over [0, batch) (batch elements, or tensor elements): one call where
    `lib` runs OpenMP threads itself, else contiguous ranges on torch's number of threads."""
    workers = max(1, min(torch.get_num_threads(), batch))
    if workers == 1 or lib.kernels_threaded():
        failed = fn(*args, 0, batch)
    else:
        bounds = [batch * i // workers for i in range(workers + 1)]
        ranges = zip(bounds, bounds[1:], strict=False)
        futures = [_pool(workers).submit(fn, *args, b0, b1) for b0, b1 in ranges]
        failed = any([future.result() for future in futures])
    if failed:
        raise MemoryError(f"a native kernel ({fn.__name__}) could not allocate its scratch memory")
