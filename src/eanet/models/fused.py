"""Faster equivalents of the reference's elementwise work, for the hot path of the model.

On a CPU the EANet training step is dominated not by matmuls but by passes over
(B, N, 256) tensors: dropout masks drawn with `bernoulli_`, and the double normalisation
with its autograd backward. These functions compute the same values in fewer passes:

- `keep_mask` draws 4 dropout decisions from each 64-bit random word (16 bits each,
  keep probability quantised to 1/65536: 0.2 becomes 0.199997) instead of one
  `bernoulli_` call per element: about 5x faster on the development CPU.
- `masked` multiplies by a 0/1 float mask written directly by the comparison; the
  1/(1-p) rescale of dropout is folded by the caller into the next linear layer's
  weights, which costs nothing.
- `double_normalize` is softmax over the tokens and division by the sum over the memory
  slots, with a hand-written backward of three passes that reuses torch's softmax backward.
"""

from __future__ import annotations

import logging

import torch

from eanet.errors import one_line

log = logging.getLogger(__name__)

_WORD_BITS = 16  # resolution of the keep probability


@torch.library.custom_op(
    "eanet::random_halves", mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,)
)
def random_halves(x: torch.Tensor) -> torch.Tensor:
    """Random int16 values shaped as `x` (4 per 64-bit word of the global RNG).

    An opaque op, so torch.compile calls it as one kernel instead of breaking its graph at
    the in-place `random_` (and instead of its own, slower, per-element generator), and the
    comparison and multiplication that follow fuse into the compiled code. It takes `x`
    itself, not its shape: compiled graphs merge calls with equal arguments, and two masks
    of one shape must still be two draws.
    """
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
    words.random_(-(2**63), None)  # all 64 bits random (the default range leaves the top bit 0)
    return words.view(torch.int16)[:n].view(x.shape)


@random_halves.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.int16, device=x.device)


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """A 0/1 mask shaped and typed as `x`, 1 with probability 1 - p (to 1/65536)."""
    threshold = -(2 ** (_WORD_BITS - 1)) + round(p * 2**_WORD_BITS)
    # comparing straight into x's dtype: multiplying by a float mask is about 2x faster
    # than torch.where or a bool mask on the CPU
    return torch.ge(random_halves(x), threshold, out=torch.empty_like(x))


def masked(x: torch.Tensor, p: float) -> torch.Tensor:
    """Zero each element with probability p, WITHOUT the 1/(1-p) rescale (the caller folds it)."""
    if p == 0.0:
        return x
    return x * keep_mask(x.detach(), p)  # the mask is no function of x: no autograd node


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
    return torch._softmax_backward_data(grad_p, p, token_dim, p.dtype)


# Training in bfloat16 on the CPU: each pass of the double normalisation over (B, N, h, S)
# costs more than the matmuls around it, so there it runs as torch.compile'd kernels (one
# fused pass forward, one backward) where a C++ compiler works; measured on the AMX Xeon of
# 2026-12-02, EANet's bf16 training step 161 -> 185 img/s (docs/speed.md). In fp32 it did not
# pay (133 vs 132 img/s). Not for inference: each new batch size recompiled it (a server's
# p99 latency went to 940 ms); there `--compile` compiles the whole forward, warmed up.
COMPILED_BF16_CPU = {"enabled": True}
_compiled: dict = {}


def _compiles(z: torch.Tensor) -> bool:
    """Whether `z`'s normalisation runs compiled: training in bfloat16 on the CPU."""
    cpu_bf16 = z.dtype == torch.bfloat16 and z.device.type == "cpu"
    training = z.requires_grad and torch.is_grad_enabled()
    return cpu_bf16 and training and COMPILED_BF16_CPU["enabled"]


def _math(fn, compiles: bool):
    """`fn`, or its compiled twin (not inside a model that is being compiled as a whole)."""
    if not compiles or torch.compiler.is_compiling():
        return fn
    if fn not in _compiled:
        _compiled[fn] = _eager_on_failure(fn, torch.compile(fn))
    return _compiled[fn]


def _eager_on_failure(fn, compiled):
    """`compiled`, falling back to `fn` for good (one warning) when compiling fails."""

    def call(*args):
        if not COMPILED_BF16_CPU["enabled"]:
            return fn(*args)
        try:
            return compiled(*args)
        except Exception as exc:  # no working C++ compiler, an inductor failure: eager
            COMPILED_BF16_CPU["enabled"] = False
            log.warning(
                "the compiled bf16 double normalisation is unavailable (%s); running eager",
                one_line(exc, with_type=True),
            )
            return fn(*args)

    return call


class _DoubleNormalize(torch.autograd.Function):
    """q = softmax(z, token_dim) / (1e-9 + sum over the last (memory) axis)."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, token_dim: int, compiles: bool) -> torch.Tensor:
        p, denom, q = _math(_normalize_forward, compiles)(z, token_dim)
        ctx.save_for_backward(p, denom)
        ctx.token_dim = token_dim
        ctx.compiles = compiles
        ctx.in_dtype = z.dtype
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        p, denom = ctx.saved_tensors
        compiles = ctx.compiles and COMPILED_BF16_CPU["enabled"]
        grad_z = _math(_normalize_backward, compiles)(grad, p, denom, ctx.token_dim)
        return grad_z.to(ctx.in_dtype), None, None


def double_normalize(z: torch.Tensor, token_dim: int = 1) -> torch.Tensor:
    """External attention's normalisation of logits `z` (..., tokens, ..., memory).

    The softmax and the sums run in fp32 whatever the input's dtype (as autocast runs
    torch's own softmax: 256 tokens and the memory sum lose too much in bfloat16's 8-bit
    mantissa); the result and the gradient come back in the input's dtype, so under
    bfloat16 autocast the dropout mask and the next matmul stream half the bytes. Training
    in bfloat16 on the CPU runs it compiled (`COMPILED_BF16_CPU`).
    """
    return _DoubleNormalize.apply(z, token_dim, _compiles(z))
