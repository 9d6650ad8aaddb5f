"""The reference's GELU (tanh approximation), with the MLP's dropout after it where asked.

`gelu_tanh` runs on the CPU kernels/gelu.c, one pass each way with the dropout inside, and
in inference a linear layer's bias added in the same pass.
"""

from __future__ import annotations

import torch

import eanet.accel.native as native
from eanet.accel.ops._common import DTYPES, check, fits_rows, on_cpu, with_bias
from eanet.accel.ops._register import kernel_op
from eanet.accel.ops.dropout import draw_seeds, drop_args, masked


def _native_gelu_applies(x: torch.Tensor) -> bool:
    """Whether kernels/gelu.c computes the tanh GELU of `x`: float32 or bfloat16 on the CPU,
    < 2^31 elements."""
    cpu = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    return cpu and x.numel() < 2**31 and native.available("gelu")


def _gelu_call(name: str, out: torch.Tensor, seeds, p: float, *tensors: torch.Tensor):
    alike = all(t.shape == out.shape and t.dtype == out.dtype for t in tensors)
    fits = on_cpu(out, seeds, *tensors) and out.dtype in DTYPES and alike
    fits = fits and seeds.numel() == 2 and 0.0 <= p < 1.0 and out.numel() < 2**31
    need = "CPU fp32 or bf16 tensors of one shape and dtype, 2 seeds, 0 <= p < 1"
    check("gelu", fits, need, *tensors, out, seeds)
    lib = native.library("gelu")
    ptrs = [t.data_ptr() for t in (*tensors, out)]
    bf16, n = int(out.dtype == torch.bfloat16), out.numel()
    native.split_batch(lib, getattr(lib, name), n, *ptrs, bf16, *drop_args(seeds, p), n)
    return out


def _backward_fake(grad: torch.Tensor, x: torch.Tensor, seeds: torch.Tensor, p: float):
    return torch.empty_like(x)


@kernel_op("gelu_tanh_cpu_backward", fake=_backward_fake)
def _native_gelu_backward(
    grad: torch.Tensor, x: torch.Tensor, seeds: torch.Tensor, p: float
) -> torch.Tensor:
    grad, x = grad.to(x.dtype).contiguous(), x.contiguous()
    return _gelu_call("gelu_backward", torch.empty_like(x), seeds, p, grad, x)


def _fake(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty(2, dtype=torch.int64)


def _setup(ctx, inputs, output) -> None:
    ctx.p = inputs[1]
    ctx.save_for_backward(inputs[0], output[1])


def _grad(ctx, grad: torch.Tensor, _grad_seeds) -> tuple[torch.Tensor, None]:
    return _native_gelu_backward(grad, *ctx.saved_tensors, ctx.p), None


@kernel_op("gelu_tanh_cpu", fake=_fake, backward=_grad, setup_context=_setup, seeded=True)
def _native_gelu(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(GELU(x) with each element dropped with probability p, the two seeds of the draws)."""
    seeds = draw_seeds(p)
    x = x.contiguous()
    return _gelu_call("gelu_forward", torch.empty_like(x), seeds, p, x), seeds


def gelu_tanh(x: torch.Tensor, p: float = 0.0, bias: torch.Tensor | None = None) -> torch.Tensor:
    """masked(F.gelu(x + bias, approximate="tanh"), p): the reference's GELU (of a linear
    layer's output and the bias it left out, where given), each result then zeroed with
    probability p (the MLP's dropout, no 1/(1-p) rescale: the caller folds it). On the CPU
    (fp32, bf16) by kernels/gelu.c, the dropout inside its pass each way, and in inference
    the bias too."""
    inference = bias is not None and p == 0.0 and not torch.is_grad_enabled() and x.dim()
    if inference and _native_gelu_applies(x) and fits_rows(bias, x):
        return _native_gelu_bias(x, bias.float())
    x = with_bias(x, bias)
    if _native_gelu_applies(x):
        return _native_gelu(x, p)[0]
    return masked(torch.nn.functional.gelu(x, approximate="tanh"), p)


def _bias_fake(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@kernel_op("gelu_tanh_bias_cpu", fake=_bias_fake)
def _native_gelu_bias(x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """GELU(x + bias) by kernels/gelu.c, bias fp32 (D,) on each of x's rows of D; no
    gradient (inference)."""
    D = x.shape[-1] if x.dim() else 0
    fits = on_cpu(x, bias) and x.dtype in DTYPES and bias.dtype == torch.float32
    fits = fits and D > 0 and bias.shape == (D,) and x.numel() < 2**31
    check("gelu", fits, "a CPU fp32 or bf16 x (..., D) and an fp32 bias (D,)", x, bias)
    x, y = x.contiguous(), torch.empty_like(x, memory_format=torch.contiguous_format)
    lib, rows = native.library("gelu"), x.numel() // D
    bf16 = int(x.dtype == torch.bfloat16)
    ptrs = (x.data_ptr(), bias.contiguous().data_ptr(), y.data_ptr())
    native.split_batch(lib, lib.gelu_bias_forward, rows, *ptrs, bf16, D, rows)
    return y
