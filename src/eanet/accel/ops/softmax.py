"""The softmax of self-attention's weights over the last axis, by kernels/softmax.c.

- `softmax_last` in CPU bf16 inference (one pass, faster than torch's there); with
  gradients, torch's.
  `softmax_last_into` calls the kernel straight into a buffer, for a loop of chunks.
- `softmax_dropout`, the same softmax with attention dropout in CPU bf16 training: the
  softmax, its mask and their backward in one pass each way.
"""

from __future__ import annotations

import torch

import eanet.accel.native as native
from eanet.accel.ops._common import check, on_cpu
from eanet.accel.ops._register import kernel_op
from eanet.accel.ops.dropout import masked, threshold


def _fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@kernel_op("softmax_cpu", fake=_fake)
def _native_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis of CPU bf16 `x`, no gradient: kernels/softmax.c."""
    fits = on_cpu(x) and x.dtype == torch.bfloat16 and x.dim() >= 1 and x.shape[-1] > 0
    check("softmax", fits and x.numel() < 2**31, "a CPU bf16 tensor of < 2^31 elements", x)
    x = x.contiguous()
    y = torch.empty_like(x)
    lib = native.library("softmax")
    L = x.shape[-1]
    native.split_batch(lib, lib.softmax_forward, x.numel() // L, x.data_ptr(), y.data_ptr(), L)
    return y


def softmax_last(x: torch.Tensor) -> torch.Tensor:
    """torch.softmax(x, dim=-1) for bf16 x without gradients (attention weights in CPU bf16
    inference); on the CPU by kernels/softmax.c, where torch's bf16 softmax was slower."""
    if _native_softmax_applies(x):
        return _native_softmax(x)
    return torch.softmax(x, dim=-1)


def _native_softmax_applies(x: torch.Tensor) -> bool:
    """Whether kernels/softmax.c computes softmax_last(x): CPU bf16 rows of L > 0, fewer
    than 2^31 elements, no gradient wanted."""
    native_ok = x.device.type == "cpu" and x.dtype == torch.bfloat16 and x.dim() >= 1
    native_ok = native_ok and x.shape[-1] > 0 and 0 < x.numel() < 2**31
    return native_ok and not x.requires_grad and native.available("softmax")


def softmax_last_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """softmax_last(x) written into `out` (x's shape and dtype, contiguous): the kernel called
    straight, without the custom op's layer or a fresh tensor, for a loop of inference
    chunks (as `double_normalize_into`)."""
    fits = out.shape == x.shape and out.dtype == x.dtype and out.is_contiguous()
    if not (fits and _native_softmax_applies(x)):
        return out.copy_(softmax_last(x))
    x, L = x.contiguous(), x.shape[-1]
    lib = native.library("softmax")
    native.split_batch(lib, lib.softmax_forward, x.numel() // L, x.data_ptr(), out.data_ptr(), L)
    return out


def _softmax_dropout_call(name: str, x: torch.Tensor, y: torch.Tensor | None, seeds, p: float):
    """kernels/softmax.c's training kernel `name` on CPU bf16 rows of x (and y)."""
    fits = on_cpu(x, y, seeds) and x.dtype == torch.bfloat16 and x.dim() >= 1
    fits = fits and x.shape[-1] > 0 and x.numel() < 2**31 and seeds.numel() == 2
    fits = fits and (y is None or (y.dtype == x.dtype and y.shape == x.shape))
    check("softmax", fits, "CPU bf16 tensors of one shape, < 2^31 elements, 2 seeds", x, y)
    x = x.contiguous()
    outs = [torch.empty_like(x) for _ in range(1 if y is not None else 2)]
    lib = native.library("softmax")
    s1, s2 = (int(s) for s in seeds.tolist())
    t, L = threshold(p), x.shape[-1]
    ptrs = [x.data_ptr()] + ([y.contiguous().data_ptr()] if y is not None else [])
    ptrs += [o.data_ptr() for o in outs]
    native.split_batch(lib, getattr(lib, name), x.numel() // L, *ptrs, s1, s2, t, L)
    return outs


def _dropout_backward_fake(grad, y, seeds, p) -> torch.Tensor:
    return torch.empty_like(grad)


@kernel_op("softmax_dropout_cpu_backward", fake=_dropout_backward_fake)
def _native_softmax_dropout_backward(
    grad: torch.Tensor, y: torch.Tensor, seeds: torch.Tensor, p: float
) -> torch.Tensor:
    """dL/dx from dL/d(masked softmax), the softmax y and the mask's seeds."""
    return _softmax_dropout_call("softmax_dropout_backward", grad, y, seeds, p)[0]


def _dropout_fake(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x), torch.empty(2, dtype=torch.int64)


def _dropout_setup(ctx, inputs, output) -> None:
    ctx.p = inputs[1]
    ctx.set_materialize_grads(False)  # the softmax and the seeds are outputs for the backward
    ctx.save_for_backward(output[1], output[2])


def _dropout_grad(ctx, grad, grad_y, _grad_seeds) -> tuple[torch.Tensor | None, None]:
    if grad_y is not None:  # the softmax itself is not handed out (softmax_dropout)
        raise RuntimeError("softmax_dropout_cpu: no gradient flows through its softmax output")
    if grad is None:
        return None, None
    y, seeds = ctx.saved_tensors
    return _native_softmax_dropout_backward(grad, y, seeds, ctx.p), None


@kernel_op(
    "softmax_dropout_cpu",
    fake=_dropout_fake,
    backward=_dropout_grad,
    setup_context=_dropout_setup,
    seeded=True,
)
def _native_softmax_dropout(
    x: torch.Tensor, p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(softmax over the last axis masked, the softmax, the mask's two seeds) of CPU bf16 x."""
    seeds = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    y, d = _softmax_dropout_call("softmax_dropout_forward", x, None, seeds, p)
    return d, y, seeds


def softmax_dropout(x: torch.Tensor, p: float) -> torch.Tensor:
    """masked(torch.softmax(x, -1), p): each weight zeroed with probability p, no 1/(1-p)
    rescale (the caller folds it). For CPU bf16 x (attention weights in bf16 training) one
    kernel pass each way (kernels/softmax.c), the masks drawn as `masked` draws them."""
    native_ok = x.device.type == "cpu" and x.dtype == torch.bfloat16 and 0 < x.numel() < 2**31
    if native_ok and p > 0.0 and native.available("softmax"):
        return _native_softmax_dropout(x, p)[0]
    return masked(torch.softmax(x, dim=-1), p)
