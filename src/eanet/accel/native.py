"""Hand-written CPU kernels (`kernels/*.c`), compiled for this machine at first use.

Where torch's own kernels make several passes over a batch through memory, a kernel here
works through one batch element at a time inside the core's cache. The C source is
compiled with the system's C compiler (`$CC`, else `cc`) with `-O3 -march=native` into
`$EANET_KERNELS` (default `~/.cache/eanet/kernels`), under a name that hashes the source,
the compiler and the CPU (the machine under a home directory can change), and loaded
with ctypes. Where there is no compiler, or compiling or loading fails, `library` returns
None after one warning and the callers run their torch equivalents.

The kernels take raw pointers and a range of the batch; `split_batch` runs the ranges on
torch's number of threads (ctypes releases the GIL during the call).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from eanet.accel.upstream import mapped_libraries
from eanet.errors import one_line
from eanet.fileio import atomic_path
from eanet.runtime import cpu_info

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent / "kernels"
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
_P, _L, _I, _U, _F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_uint32, ctypes.c_float
SIGNATURES = {
    "double_normalize": {
        "dn_forward": [_P, _P, _P, _P, _I, _L, _L, _L, _L, _L],
        "dn_backward": [_P, _P, _P, _P, _P, _I, _L, _L, _L, _L, _L],
        "kernels_threaded": [],
    },
    "gelu": {
        "gelu_forward": [_P, _P, _I, _L, _L, _L],
        "gelu_backward": [_P, _P, _P, _I, _L, _L, _L],
        "kernels_threaded": [],
    },
    "layer_norm": {
        "ln_forward": [_P] * 8 + [_I, _L, _F, _L, _L],
        "ln_backward": [_P] * 9 + [_I, _L, _L, _L, _L],
        "ln_block_rows": [],
        "kernels_threaded": [],
    },
    "dropout": {
        "keep_32bit": [_P, _P, _U, _U, _U, _L, _L, _L],
        "keep_16bit": [_P, _P, _U, _U, _U, _L, _L, _L],
        "kernels_threaded": [],
    },
}


def cache_dir() -> Path:
    env = os.environ.get("EANET_KERNELS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "eanet" / "kernels"


def _compiler_id(cc: str) -> str:
    out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
    return out.stdout.splitlines()[0] if out.stdout else cc


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


def _build(name: str, cc: str) -> Path:
    """The shared library of kernels/<name>.c for this compiler and CPU, compiled if missing."""
    source = b"".join(p.read_bytes() for p in [SOURCES / f"{name}.c", *sorted(SOURCES.glob("*.h"))])
    model, cpu_flags = cpu_info()
    runtime = openmp_runtime()
    flags = [*FLAGS]
    if runtime:  # link the runtime torch has loaded, and find it again at load time
        flags += ["-fopenmp", runtime, f"-Wl,-rpath,{Path(runtime).parent}"]
    key = [source, _compiler_id(cc).encode(), " ".join(flags).encode()]
    key += [str(model).encode(), " ".join(cpu_flags).encode(), platform.machine().encode()]
    digest = hashlib.sha256(b"\0".join(key)).hexdigest()[:16]
    target = cache_dir() / f"{name}-{digest}.so"
    if not target.exists():
        with atomic_path(target) as tmp:
            cmd = [cc, str(SOURCES / f"{name}.c"), *flags, "-o", str(tmp)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                raise RuntimeError(f"{cc} failed: {one_line(out.stderr or out.stdout)}")
        log.info("compiled the %s kernels into %s", name, target)
    return target


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The loaded kernels of kernels/<name>.c, or None (one warning) where they cannot be had."""
    cc = os.environ.get("CC") or "cc"
    if platform.system() != "Linux" or shutil.which(cc) is None:
        log.warning("no C compiler (%s) found: the native %s kernels are off", cc, name)
        return None
    try:
        lib = ctypes.CDLL(str(_build(name, cc)))
        for fn, argtypes in SIGNATURES[name].items():
            getattr(lib, fn).argtypes = argtypes
            getattr(lib, fn).restype = ctypes.c_int
    except Exception as exc:  # a compiler error, an unwritable cache, a bad library
        log.warning(
            "the native %s kernels are off (%s); running torch's ops",
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
    libs = {name: library(name) if ENABLED["native"] else None for name in SIGNATURES}
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
