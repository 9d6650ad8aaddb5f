"""External attention's double normalisation: softmax over the tokens, then division by the
sum over the memory slots.

On the CPU (fp32 or bf16) `double_normalize` runs the hand-written kernel of
kernels/double_normalize.c: one pass per batch element inside the cache, forward and
backward, where torch's ops make several passes over memory (the measurements are in
`benchmarks/results/` and the commits that chose it). Elsewhere (CUDA, float64, no C
compiler) the torch ops below, with a hand-written backward of three passes that reuses
torch's softmax backward."""

from __future__ import annotations

import torch

import eanet.accel.native as native
from eanet.accel.ops._common import DTYPES, check, on_cpu
from eanet.accel.ops._register import kernel_op
from eanet.accel.ops.dropout import draw_seeds, drop_args, masked
from eanet.accel.upstream import softmax_backward


def _normalize_forward(z: torch.Tensor, token_dim: int) -> tuple[torch.Tensor, ...]:
    """(p, D, q): p = softmax over tokens, D = eps + sum_S p, q = p / D in z's dtype."""
    # At least fp32 whatever z's dtype (bfloat16 under autocast); the result in z's dtype.
    p = torch.softmax(z, dim=token_dim, dtype=torch.promote_types(z.dtype, torch.float32))
    denom = p.sum(dim=-1, keepdim=True).add_(1e-9)
    return p, denom, (p / denom).to(z.dtype)


def _normalize_backward(
    grad: torch.Tensor, p: torch.Tensor, denom: torch.Tensor, token_dim: int
) -> torch.Tensor:
    """dL/dz from dL/dq, in p's dtype (fp32)."""
    grad = grad.to(p.dtype)
    # through q = p / D with D = eps + sum_S p:  dL/dp = (g - sum_S(g * p) / D) / D
    inner = (grad * p).sum(dim=-1, keepdim=True).div_(denom)
    grad_p = (grad - inner).div_(denom)
    # through the softmax over tokens: p * (grad_p - sum_N(grad_p * p))
    return softmax_backward(grad_p, p, token_dim, p.dtype)


def _forward_fake(z: torch.Tensor, seeds: torch.Tensor, p: float) -> tuple[torch.Tensor, ...]:
    B, _, h, S = z.shape
    stats = z.new_empty((B, h * S), dtype=torch.float32)
    return torch.empty_like(z), stats, torch.empty_like(stats)


# no autograd of its own: _DoubleNormalize below calls it and its backward
@kernel_op("double_normalize_cpu", fake=_forward_fake)
def _native_forward(
    z: torch.Tensor, seeds: torch.Tensor, p: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, column max, column 1/sum) of z (B, N, h, S): kernels/double_normalize.c; q with
    the attention dropout of probability p drawn from the two seeds (p = 0: none)."""
    fits = on_cpu(z, seeds) and z.dtype in DTYPES and z.dim() == 4 and z.numel() < 2**31
    fits = fits and seeds.numel() == 2 and 0.0 <= p < 1.0
    check("double_normalize", fits, "CPU fp32 or bf16 logits (B, N, h, S), 2 seeds", z, seeds)
    q = torch.empty_like(z, memory_format=torch.contiguous_format)
    colmax, colinv = _dn_stats(z)
    _dn_forward(z, q, colmax, colinv, drop_args(seeds, p))
    return q, colmax, colinv


def _dn_stats(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fp32 (B, h*S) tensors for the per-column max and 1/sum of z (B, N, h, S), which
    the forward keeps for the backward."""
    B, _, h, S = z.shape
    colmax = torch.empty((B, h * S), dtype=torch.float32)
    return colmax, torch.empty_like(colmax)


def _dn_forward(z: torch.Tensor, q: torch.Tensor, colmax, colinv, drop) -> None:
    """kernels/double_normalize.c's forward of z (B, N, h, S) into the contiguous q, its
    statistics into colmax and colinv (`_dn_stats`), the dropout `drop` (`drop_args`)."""
    B, N, h, S = z.shape
    z = z.contiguous()
    lib = native.library("double_normalize")
    ptrs = (z.data_ptr(), q.data_ptr(), colmax.data_ptr(), colinv.data_ptr())
    bf16 = int(z.dtype == torch.bfloat16)
    native.split_batch(lib, lib.dn_forward, B, *ptrs, bf16, N, h * S, S, *drop)


def _backward_fake(grad, z, colmax, colinv, seeds, p) -> torch.Tensor:
    return torch.empty_like(z)


@kernel_op("double_normalize_cpu_backward", fake=_backward_fake)
def _native_backward(
    grad: torch.Tensor,
    z: torch.Tensor,
    colmax: torch.Tensor,
    colinv: torch.Tensor,
    seeds: torch.Tensor,
    p: float,
) -> torch.Tensor:
    """dL/dz from dL/dq, recomputing the softmax from z and the forward's column statistics
    (and the dropout mask from its seeds)."""
    B, N, h, S = z.shape if z.dim() == 4 else (-1,) * 4  # -1: no shape fits
    stats = all(t.shape == (B, h * S) and t.dtype == torch.float32 for t in (colmax, colinv))
    fits = grad.shape == z.shape == (B, N, h, S) and stats
    fits = fits and on_cpu(grad, z, colmax, colinv, seeds) and z.dtype in DTYPES
    fits = fits and seeds.numel() == 2 and 0.0 <= p < 1.0 and z.numel() < 2**31
    need = "CPU logits (B, N, h, S), their gradient, fp32 statistics (B, h * S), 2 seeds"
    check("double_normalize", fits, need, grad, z, colmax, colinv, seeds)
    grad, z = grad.to(z.dtype).contiguous(), z.contiguous()
    colmax, colinv = colmax.contiguous(), colinv.contiguous()
    grad_z = torch.empty_like(z)
    lib = native.library("double_normalize")
    ptrs = (grad.data_ptr(), z.data_ptr(), colmax.data_ptr(), colinv.data_ptr())
    bf16 = int(z.dtype == torch.bfloat16)
    drop = drop_args(seeds, p)
    native.split_batch(lib, lib.dn_backward, B, *ptrs, grad_z.data_ptr(), bf16, N, h * S, S, *drop)
    return grad_z


def _runs_native(z: torch.Tensor, token_dim: int) -> bool:
    """Whether the native kernel computes z's normalisation: (B, N, h, S) on the CPU."""
    layout = z.dim() == 4 and token_dim == 1 and z.device.type == "cpu"
    return (
        layout
        and z.dtype in (torch.float32, torch.bfloat16)
        and native.available("double_normalize")
    )


class _DoubleNormalize(torch.autograd.Function):
    """q = softmax(z, token_dim) / (1e-9 + sum over the last (memory) axis)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, token_dim: int, native: bool, p: float) -> torch.Tensor:
        ctx.token_dim, ctx.native, ctx.in_dtype, ctx.p = token_dim, native, z.dtype, p
        if native:  # the dropout's seeds from torch's generator, as the dropout kernel's
            seeds = draw_seeds(p)
            q, colmax, colinv = _native_forward(z, seeds, p)
            ctx.save_for_backward(z, colmax, colinv, seeds)
            return q
        p, denom, q = _normalize_forward(z, token_dim)
        ctx.save_for_backward(p, denom)
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        if ctx.native:
            return _native_backward(grad, *ctx.saved_tensors, ctx.p), None, None, None
        p, denom = ctx.saved_tensors
        grad_z = _normalize_backward(grad, p, denom, ctx.token_dim)
        return grad_z.to(ctx.in_dtype), None, None, None


def double_normalize(z: torch.Tensor, token_dim: int = 1, p: float = 0.0) -> torch.Tensor:
    """External attention's normalisation of logits `z` (..., tokens, ..., memory).

    The softmax and the sums run in fp32 whatever the input's dtype (as autocast runs
    torch's own softmax: 256 tokens and the memory sum lose too much in bfloat16's 8-bit
    mantissa); the result and the gradient come back in the input's dtype, so under
    bfloat16 autocast the dropout mask and the next matmul stream half the bytes. On the
    CPU, for (B, N, h, S) logits with the tokens on axis 1, it runs the native kernel.
    `p` > 0 zeroes each result with probability p, as `masked` does (no rescale; the
    attention dropout), inside the kernel's own passes where it runs.
    """
    native = _runs_native(z, token_dim) and z.numel() < 2**31
    q = _DoubleNormalize.apply(z, token_dim, native, p if native else 0.0)
    return q if native else masked(q, p)


def double_normalize_into(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """double_normalize(z) of CPU logits (B, N, h, S) written into `out` (z's shape, dtype,
    contiguous), without gradient or dropout: a loop of inference chunks calls this once a
    chunk, and going straight to the kernel (no autograd function, custom op or fresh
    tensors) spares each call their overhead."""
    fits = out.shape == z.shape and out.dtype == z.dtype and out.is_contiguous()
    if not (fits and _runs_native(z, 1) and z.numel() < 2**31):
        return out.copy_(double_normalize(z, token_dim=1))
    _dn_forward(z, out, *_dn_stats(z), (0, 0, 0))  # no dropout; the statistics unused
    return out
