"""Where and how computation runs: device choice, threads, seeding, environment facts."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from eanet.choices import PRECISIONS
from eanet.errors import ConfigError
from eanet.fileio import atomic_path

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# /proc/cpuinfo flags that say what the CPU computes natively (and is worth naming).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_allocator_tuned = False


def tune_cpu_allocator(mmap_threshold: int = 1 << 30) -> bool:
    """Keep big tensors on the reusable heap instead of fresh mmap pages (glibc only).

    glibc serves allocations above 32 MiB with mmap and returns them at free, so every
    (128, 256, 256) float tensor of a training step (33.5 MB) is page-faulted in anew,
    several times slower than a multiply into reused memory. Raising the mmap and trim
    thresholds makes freed blocks reusable.
    The price: the process keeps its peak memory instead of returning it to the system.
    """
    global _allocator_tuned
    if _allocator_tuned:
        return True
    name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        ok = libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
        ok = ok and libc.mallopt(_M_TRIM_THRESHOLD, 2 * mmap_threshold) == 1
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        return False
    _allocator_tuned = ok
    log.debug("glibc allocator thresholds raised: %s", ok)
    return ok


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; asking for cuda without a GPU is an error."""
    if name not in DEVICES and not name.startswith("cuda:"):
        raise ConfigError(f"device {name!r} must be one of {', '.join(DEVICES)} (or cuda:N)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"device {name!r} asked for but no CUDA GPU is available; use --device cpu"
        )
    return torch.device(name)


@functools.cache
def cpu_info() -> tuple[str | None, tuple[str, ...]]:
    """(model name, the CPU_FLAGS it has) from /proc/cpuinfo; (None, ()) where unreadable."""
    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = value.strip()
                elif key == "flags" and not flags:
                    flags = set(value.split())
                if model is not None and flags:
                    break
    except OSError:
        pass
    return model, tuple(f for f in CPU_FLAGS if f in flags)


# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) without bf16 dot products: bf16 matmuls are emulated
_ONEDNN_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE")
_ONEDNN_WITHOUT_BF16 += ("AVX512_CORE_VNNI",)
BF16_PAYS = 1.2  # `auto` takes bf16 where the probe's bf16 matmuls are this much faster
_warned = set()


def cpu_bf16_missing() -> str | None:
    """Why bf16 would run emulated on this CPU (a phrase), or None where torch computes it
    natively: the CPU has avx512_bf16 or AMX, torch runs its AVX-512 kernels
    (ATEN_CPU_CAPABILITY honoured) and oneDNN may use bf16 (ONEDNN_MAX_CPU_ISA honoured)."""
    flags = set(cpu_info()[1])
    if not flags & {"avx512_bf16", "amx_bf16"}:
        return "the CPU has neither avx512_bf16 nor AMX"
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.upper().startswith("AVX512"):
        return f"torch runs its {capability} kernels (ATEN_CPU_CAPABILITY)"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL"
    if isa.upper() in _ONEDNN_WITHOUT_BF16:
        return f"oneDNN is capped at {isa.upper()} (ONEDNN_MAX_CPU_ISA)"
    return None


def _median_s(fn, runs: int = 5) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernel
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[runs // 2]


def probe_bf16_speedup() -> float:
    """fp32 time / bf16 time of the model's typical matmul ((8192, 64) x (64, 256), as
    external attention's input projection): a few milliseconds each, under 0.2 s in all."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8192, 64, generator=g), torch.randn(256, 64, generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    with torch.inference_mode():
        fp32 = _median_s(lambda: torch.nn.functional.linear(x, w))
        bf16 = _median_s(lambda: torch.nn.functional.linear(xb, wb))
    return fp32 / bf16


def _probe_cache() -> Path:
    return Path.home() / ".cache" / "eanet" / "bf16-probe.json"


def _probe_key() -> str:
    model, flags = cpu_info()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or ""
    parts = [model or "?", " ".join(flags), torch.__version__, isa, str(torch.get_num_threads())]
    return "|".join(parts)


@functools.cache
def cpu_bf16_pays() -> bool:
    """Whether bf16 is faster than fp32 here: native bf16 (`cpu_bf16_missing`) and a probe of
    matmuls, measured once per machine, torch version and thread count and kept in
    ~/.cache/eanet/bf16-probe.json (read only where this user owns it)."""
    if cpu_bf16_missing() is not None:
        return False
    path, key = _probe_cache(), _probe_key()
    known = _read_own_json(path)
    if key not in known:
        known[key] = round(probe_bf16_speedup(), 3)
        log.info("bf16 probe: bf16 matmuls %.2fx fp32's on this CPU", known[key])
        _write_own_json(path, known)
    return known[key] >= BF16_PAYS


def _read_own_json(path: Path) -> dict:
    """`path`'s JSON object where this user owns it and nobody else may write it, else {}."""
    try:
        st = path.stat()
        if st.st_uid != os.getuid() or st.st_mode & 0o022:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_own_json(path: Path, data: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    except OSError as exc:  # an unwritable home: the probe runs again next time
        log.debug("bf16 probe not cached (%s)", exc)


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively (and, on a CPU, faster than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_bf16_pays()
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """'fp32' or 'bf16' for `device`: 'auto' is bf16 where the device computes it natively
    and faster; an explicit 'bf16' on a CPU that would emulate it runs, with one warning."""
    if name not in PRECISIONS:
        raise ConfigError(f"--precision {name!r} must be one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    if name == "bf16" and device.type == "cpu":
        _warn_emulated_bf16()
    return name


def _warn_emulated_bf16() -> None:
    why = cpu_bf16_missing()
    if why is None or "bf16" in _warned:
        return
    _warned.add("bf16")
    log.warning(
        "--precision bf16 on this CPU runs emulated (%s): expect it several times slower "
        "than fp32; --precision auto or fp32 is faster here",
        why,
    )


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The one precision context of training, evaluation, prediction, bench and serving.

    'bf16': bfloat16 autocast (matmuls and what torch lists as autocast-safe; reductions
    stay fp32); 'fp32': nothing changes. `precision` must be resolved (not 'auto').
    """
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise ValueError(f"unresolved precision {precision!r}")
    return contextlib.nullcontext()


def set_threads(threads: int | None) -> None:
    """Set torch's intra-op threads (None keeps torch's default: one per core)."""
    if threads is not None:
        if threads < 1:
            raise ConfigError(f"threads={threads} must be >= 1")
        torch.set_num_threads(threads)


def environment() -> dict:
    """Facts worth recording next to any figure: machine, versions, threads."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    model, flags = cpu_info()
    if model is not None:
        info["cpu_model"] = model
    info["cpu_flags"] = list(flags)
    info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return info
