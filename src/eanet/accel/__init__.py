"""Speed for the plain model, applied from outside: `apply(model, device=..., precision=...)`.

`eanet.models` is the Keras example in plain torch ops. This package makes it fast
without changing what it computes: `apply` swaps faster equivalents in for the model's
layers (`modules`: folded memories, fused attention, the MLP and the LayerNorm with the
residual add on hand-written kernels), and says what it did. The layers run their ops
through `fused`, which re-exports `ops` (one module of custom autograd ops per kernel,
beside its `kernels/<name>.c`), whose CPU kernels `native` compiles at first use into a
cache it owns. The private upstream names it relies on are in
`upstream`, each with its reason. Each faster class says which modules it supports
(`modules.FastLayer`: the exact plain class, and the children and attributes its fast path
reads); `apply` leaves any other module plain and lists it with the reason in the report
(`AccelReport.plain`), so a model a user changed runs, as itself. `train`, `evaluate`,
`predict`, `serve`, `bench` and `eanet.load` call `apply` once; `--no-accel` runs the plain
model. On the CPU `apply` also raises glibc's mmap threshold (`runtime.tune_cpu_allocator`),
so that the big activations of every forward pass reuse memory instead of being
page-faulted in anew.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import eanet.accel.native as native
from eanet.accel.modules import SWAPS, FastLayer, FusedBlocks
from eanet.models.layers import Block
from eanet.runtime import resolve_precision, tune_cpu_allocator

__all__ = ["AccelReport", "apply", "restore"]


@dataclass(frozen=True)
class AccelReport:
    """What `apply` did: the device and resolved precision, the swapped layers, the layers
    left plain and why, the kernels."""

    device: str
    precision: str
    modules: dict[str, int] = field(default_factory=dict)  # faster class -> how many
    kernels: list[str] = field(default_factory=list)  # native CPU kernels loaded
    allocator_tuned: bool = False  # glibc keeps big blocks for reuse (`runtime.tune_cpu_allocator`)
    # module path -> why it stays plain where a faster class would run it ('FastMlp: act is
    # SiLU, not GELU'); '(model)' for the model itself
    plain: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line, e.g. 'cpu bf16: 8 FoldedExternalAttention, ...; kernels: gelu, ...'."""
        mods = ", ".join(f"{n} {name}" for name, n in self.modules.items()) or "no layer swapped"
        kernels = ", ".join(self.kernels) or "none"
        plain = f"; left plain: {', '.join(self.plain)}" if self.plain else ""
        return f"{self.device} {self.precision}: {mods}; native kernels: {kernels}{plain}"


FAST_CLASSES = frozenset({fast for fast, _ in SWAPS.values()} | {FusedBlocks})


def _candidate(module: nn.Module, device: torch.device, precision: str) -> type[FastLayer] | None:
    """The faster class that would run `module` on `device` in `precision` if it supports it:
    by the plain class it is (or subclasses, to be reported), and for a sequence holding
    blocks the fused blocks (the add + LayerNorm kernel runs under CPU bf16 autocast only)."""
    if type(module) in FAST_CLASSES:
        return None  # applied already
    for base, (fast, devices) in SWAPS.items():
        if isinstance(module, base) and device.type in devices:
            return fast
    bf16_cpu = device.type == "cpu" and precision == "bf16"
    blocks = isinstance(module, nn.Sequential) and any(isinstance(b, Block) for b in module)
    return FusedBlocks if bf16_cpu and blocks else None


def apply(
    model: nn.Module, device: str | torch.device | None = None, precision: str = "fp32"
) -> AccelReport:
    """Swap in, in place, the faster equivalent of each layer that pays on `device` (default:
    the model's) in `precision` ('fp32', 'bf16' or 'auto'); return what was done.

    The model keeps its parameters, their names and its state dict; `restore` undoes it.
    A layer its faster class does not support (`FastLayer.unsupported`: a user's subclass,
    another activation, a linear layer without the bias the fast path reads, ...) stays
    plain and is listed in the report's `plain` with the reason; `apply` never refuses.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    plain = {}
    for path, module in model.named_modules():
        fast = _candidate(module, device, precision)
        if fast is None:
            continue
        if (reason := fast.unsupported(module)) is None:
            module.__class__ = fast
        else:
            plain[path or "(model)"] = f"{fast.__name__}: {reason}"
    counts = Counter(type(m).__name__ for m in model.modules() if type(m) in FAST_CLASSES)
    cpu = device.type == "cpu"
    kernels = native.status()["on"] if cpu else []
    # a step's big activations reuse freed memory instead of fresh page-faulted mmap pages
    tuned = cpu and tune_cpu_allocator()
    modules = dict(sorted(counts.items()))
    return AccelReport(str(device), precision, modules, kernels, tuned, plain)


def restore(model: nn.Module) -> nn.Module:
    """Undo `apply` in place: every layer back to its plain class; returns the model."""
    plain = {fast: base for base, (fast, _) in SWAPS.items()} | {FusedBlocks: nn.Sequential}
    for module in model.modules():
        if type(module) in plain:
            module.__class__ = plain[type(module)]
            module.__dict__.pop("_folded", None)
    return model
