"""What the ops share, as kernels/common.h is what the kernels share: the checks before a
native call (the C code trusts the sizes it is given) and small tensor helpers."""

from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.bfloat16)  # what the native kernels read and write


def check(kernel: str, ok: bool, need: str, *given: torch.Tensor | None) -> None:
    """Refuse a native kernel call whose tensors do not fit: the C code trusts the sizes it
    is given (a LayerNorm weight shorter than its rows would be read past its end)."""
    if not ok:
        got = ", ".join(
            "None" if t is None else f"{t.dtype} {tuple(t.shape)} {t.device}" for t in given
        )
        raise ValueError(f"the native {kernel} kernel needs {need}; got {got}")


def on_cpu(*tensors: torch.Tensor | None) -> bool:
    return all(t is None or t.device.type == "cpu" for t in tensors)


def ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def with_bias(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x + bias in x's dtype (a linear layer's output and the bias it left out), or x."""
    return x if bias is None else x + bias.to(x.dtype)


def fits_rows(bias: torch.Tensor | None, x: torch.Tensor) -> bool:
    """Whether `bias` (or none) can go into a kernel over x's rows: (D,) on x's device."""
    return bias is None or (bias.shape == x.shape[-1:] and bias.device == x.device)


def fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None else t.float()
