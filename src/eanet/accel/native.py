"""Hand-written CPU kernels (`kernels/*.c`), compiled for this machine at first use.

Where torch's own kernels make several passes over a batch through memory, a kernel here
works through one batch element at a time inside the core's cache. The C source is
compiled with the system's C compiler (`$CC`, which may carry arguments, else `cc`) with
`-O3 -march=native` into `$EANET_KERNELS` (default `~/.cache/eanet/kernels`), under a name
that hashes the source, the compiler and the CPU (the machine under a home directory can
change), and loaded with ctypes; the ctypes signatures are read from the C prototypes.

Loading a library runs its code, so the cache is owned as Inductor owns its own: the
directory is created 0700 and used only while it belongs to this user and no one else can
write to it; each library is written 0755 beside the sha256 of its bytes, and loaded only
while it is this user's and matches (else rebuilt: a truncated library would kill the
process with a bus error); compiling happens under a lock in the directory, with a time
limit. Where there is no compiler, the directory is not private, or a compile fails,
`library` returns None after one warning (and compiles nothing more in this process), and
the callers run their torch equivalents.

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
COMPILE_TIMEOUT = 60  # seconds per kernel (each takes under 3 s on the development CPU)
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


def cache_dir() -> Path:
    env = os.environ.get("EANET_KERNELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eanet" / "kernels"


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


def _private_dir(directory: Path) -> str | None:
    """None where `directory` is this user's alone (created 0700 where missing), else why not.

    Missing parents are created 0755 at most, whatever the umask."""
    try:
        for parent in reversed(directory.parents):
            if not parent.is_dir():
                parent.mkdir(mode=0o755, exist_ok=True)
        directory.mkdir(mode=0o700, exist_ok=True)  # the umask can only take bits away
        st = directory.stat()
    except OSError as exc:
        return f"cannot create {directory} ({exc.strerror or exc})"
    if not stat.S_ISDIR(st.st_mode):
        return f"{directory} is not a directory"
    if st.st_uid != os.geteuid():
        return f"{directory} belongs to another user (uid {st.st_uid})"
    if st.st_mode & 0o022:
        return f"{directory} is writable by others (mode {stat.filemode(st.st_mode)})"
    return None


@functools.cache
def _setup(cc: str, directory: Path) -> _Cache | None:
    """The compiler and cache directory, or None after one warning saying what to change."""
    argv = []
    with contextlib.suppress(ValueError):  # unbalanced quotes: no compiler
        argv = shlex.split(cc)
    if platform.system() != "Linux":
        log.warning("the native kernels are built for Linux only: running torch's ops")
        return None
    if not argv or shutil.which(argv[0]) is None:
        log.warning(
            "no C compiler (%s) found: the native kernels are off, running torch's ops "
            "(install gcc, or set CC to a C compiler)",
            cc,
        )
        return None
    problem = _private_dir(directory)
    if problem:
        log.warning(
            "the native kernels are off, running torch's ops: %s; make it a directory of "
            "your own that only you can write to (chmod 700), or set EANET_KERNELS to one",
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
    they would spin beside torch's threads (measured: the kernel took 2x as long). Other
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


def _read_own(path: Path) -> bytes:
    """The bytes of `path`, a regular file of this user's that no one else can write;
    OSError (ValueError for a wrong owner or mode) where it is not that."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise ValueError(f"{path} is not a file of this user's that only they can write")
        return f.read()


def _verified(library: Path) -> bool:
    """Whether `library` is there, this user's, and matches the sha256 recorded beside it.
    One that does not (truncated, replaced, a crash mid-write) is said so and rebuilt."""
    if not library.exists() and not library.is_symlink():
        return False
    try:
        recorded = _read_own(_sha256_path(library)).decode("ascii").strip()
        actual = hashlib.sha256(_read_own(library)).hexdigest()
    except FileNotFoundError:
        problem = f"no sha256 is recorded beside {library}"
    except (OSError, ValueError) as exc:
        problem = one_line(exc)
    else:
        if recorded == actual:
            return True
        problem = f"{library} does not match its recorded sha256 (damaged or replaced)"
    log.warning("the cached native kernels are not loaded: %s; rebuilding them", problem)
    return False


@contextlib.contextmanager
def _locked(directory: Path) -> Iterator[None]:
    """Hold the cache's lock: one process at a time checks, cleans and compiles."""
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _clean_temporaries(directory: Path) -> None:
    """Delete the temporary files of compiles that never finished (a SIGKILL, a power cut):
    under the lock no compile is running, so every one there is stale."""
    for tmp in directory.glob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            log.debug("removed the stale temporary file %s", tmp)


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


def _compile(name: str, cache: _Cache, flags: list[str], target: Path) -> None:
    """Compile kernels/<name>.c into `target` (0755) and its sha256 beside it (0644)."""
    if not cache.announced:
        log.info("compiling native kernels (first use) into %s", cache.directory)
        cache.announced = True
    with _new_file(target, 0o755) as tmp:
        what = f"{shlex.join(cache.cc)} {name}.c"
        _run([*cache.cc, str(SOURCES / f"{name}.c"), *flags, "-o", str(tmp)], COMPILE_TIMEOUT, what)
        data = tmp.read_bytes()
        if not data.startswith(b"\x7fELF"):
            raise RuntimeError(f"{what} exited 0 but wrote no shared library")
        with _new_file(_sha256_path(target), 0o644) as digest:
            digest.write_text(hashlib.sha256(data).hexdigest() + "\n", encoding="ascii")
    log.debug("compiled the %s kernels into %s", name, target)


def _build(name: str, cache: _Cache) -> Path | None:
    """The checked library of kernels/<name>.c, compiled if missing or damaged; None where it
    would need compiling after an earlier failure in this process."""
    flags = _flags()
    target = _target(name, cache, flags)
    with _locked(cache.directory):
        if _verified(target):
            return target
        if cache.failed:
            log.debug("not compiling the %s kernels after an earlier failure", name)
            return None
        _clean_temporaries(cache.directory)
        _compile(name, cache, flags, target)
    return target


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The loaded kernels of kernels/<name>.c, or None (one warning) where they cannot be had."""
    cache = _setup(os.environ.get("CC") or "cc", cache_dir())
    if cache is None:
        return None
    try:
        path = _build(name, cache)
        if path is None:
            return None
        lib = ctypes.CDLL(str(path))
        for fn, (argtypes, restype) in signatures(name).items():
            getattr(lib, fn).argtypes = argtypes
            getattr(lib, fn).restype = restype
    except Exception as exc:  # a compiler error, an unwritable cache, a bad library
        cache.failed = True
        log.warning(
            "the native %s kernels are off, running torch's ops, and no more are compiled "
            "in this process: %s",
            name,
            one_line(exc, with_type=True),
        )
        return None
    return lib


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
