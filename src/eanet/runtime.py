"""Where and how computation runs: device choice, threads, seeding, environment facts."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import logging
import os
import platform

import torch

from eanet.choices import PRECISIONS
from eanet.errors import ConfigError

log = logging.getLogger(__name__)

DEVICES = ("auto", "cpu", "cuda")
# /proc/cpuinfo flags that say what the CPU computes natively (and is worth naming).
CPU_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_allocator_tuned = False


def tune_cpu_allocator(mmap_threshold: int = 1 << 30) -> bool:
    """Keep big tensors on the reusable heap instead of fresh mmap pages (glibc only).

    glibc serves allocations above 32 MiB with mmap and returns them at free, so every
    (128, 256, 256) float tensor of a training step (33.5 MB) is page-faulted in anew:
    on the 2-core development machine a fresh 33.5 MB multiply took 30 ms against 7 ms
    with reused memory. Raising the mmap and trim thresholds makes freed blocks reusable.
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


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bfloat16 natively: CUDA with bf16, or avx512_bf16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        flags = cpu_info()[1]
        return "avx512_bf16" in flags or "amx_bf16" in flags
    return False


def resolve_precision(name: str, device: torch.device) -> str:
    """'fp32' or 'bf16' for `device`: 'auto' is bf16 where the device computes it natively."""
    if name not in PRECISIONS:
        raise ConfigError(f"--precision {name!r} must be one of {', '.join(PRECISIONS)}")
    if name == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return name


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
