"""Speed for the plain model, applied from outside: `apply(model, device=..., precision=...)`.

`eanet.models` is the Keras example in plain torch ops. This package makes it fast
without changing what it computes: `apply` swaps faster equivalents in for the model's
layers (`modules`: folded memories, fused attention, the MLP and the LayerNorm with the
residual add on hand-written kernels), and says what it did. The layers run their ops
through `fused` (custom autograd ops), whose CPU kernels `native` compiles at first use
from `kernels/*.c` into a cache it owns. The private upstream names it relies on are in
`upstream`, each with its reason. `train`, `evaluate`, `predict`, `serve`, `bench` and
`eanet.load` call `apply` once; `--no-accel` runs the plain model. On the CPU `apply` also
raises glibc's mmap threshold (`runtime.tune_cpu_allocator`), so that the big activations
of every forward pass reuse memory instead of being page-faulted in anew.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

import eanet.accel.native as native
from eanet.accel.modules import SWAPS, FusedBlocks
from eanet.models.layers import Block
from eanet.runtime import resolve_precision, tune_cpu_allocator

__all__ = ["AccelReport", "apply", "restore"]


@dataclass(frozen=True)
class AccelReport:
    """What `apply` did: the device and resolved precision, the swapped layers, the kernels."""

    device: str
    precision: str
    modules: dict[str, int] = field(default_factory=dict)  # faster class -> how many
    kernels: list[str] = field(default_factory=list)  # native CPU kernels loaded
    allocator_tuned: bool = False  # glibc keeps big blocks for reuse (`runtime.tune_cpu_allocator`)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line, e.g. 'cpu bf16: 8 FoldedExternalAttention, ...; kernels: gelu, ...'."""
        mods = ", ".join(f"{n} {name}" for name, n in self.modules.items()) or "no layer swapped"
        kernels = ", ".join(self.kernels) or "none"
        return f"{self.device} {self.precision}: {mods}; native kernels: {kernels}"


def _is_block_sequence(module: nn.Module) -> bool:
    return (
        type(module) is nn.Sequential
        and len(module) > 0
        and all(isinstance(b, Block) for b in module)
    )


def apply(
    model: nn.Module, device: str | torch.device | None = None, precision: str = "fp32"
) -> AccelReport:
    """Swap in, in place, the faster equivalent of each layer that pays on `device` (default:
    the model's) in `precision` ('fp32', 'bf16' or 'auto'); return what was done.

    The model keeps its parameters, their names and its state dict; `restore` undoes it.
    """
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    for module in model.modules():
        fast, devices = SWAPS.get(type(module), (None, ()))
        if fast is not None and device.type in devices:
            module.__class__ = fast
        # the fused add + LayerNorm kernel runs under CPU bf16 autocast only
        elif device.type == "cpu" and precision == "bf16" and _is_block_sequence(module):
            module.__class__ = FusedBlocks
    fast_classes = {fast for fast, _ in SWAPS.values()} | {FusedBlocks}
    counts = Counter(type(m).__name__ for m in model.modules() if type(m) in fast_classes)
    cpu = device.type == "cpu"
    kernels = native.status()["on"] if cpu else []
    # a step's big activations reuse freed memory instead of fresh page-faulted mmap pages
    tuned = cpu and tune_cpu_allocator()
    return AccelReport(str(device), precision, dict(sorted(counts.items())), kernels, tuned)


def restore(model: nn.Module) -> nn.Module:
    """Undo `apply` in place: every layer back to its plain class; returns the model."""
    plain = {fast: base for base, (fast, _) in SWAPS.items()} | {FusedBlocks: nn.Sequential}
    for module in model.modules():
        if type(module) in plain:
            module.__class__ = plain[type(module)]
            module.__dict__.pop("_folded", None)
    return model
