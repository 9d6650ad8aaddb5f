"""Dropout masks without the 1/(1-p) rescale (the caller folds it into the next layer).

- `keep_mask` draws 4 dropout decisions from each 64-bit random word (16 bits each,
  keep probability quantised to 1/65536: 0.2 becomes 0.199997) instead of one
  `bernoulli_` call per element, several times faster.
- `masked` multiplies by a 0/1 float mask written directly by the comparison; the
  1/(1-p) rescale of dropout is folded by the caller into the next linear layer's
  weights, which costs nothing. On the CPU it runs kernels/dropout.c instead: draws from
  a counter-based generator seeded from torch's, the mask applied in the same pass and
  recomputed from the two seeds in the backward (no mask tensor at all).

The other kernels draw dropout.c's mask inside their own passes (common.h's `drop_row`),
from the arguments made here: `draw_seeds`, `drop_args`, `threshold`.
"""

from __future__ import annotations

import torch

import eanet.accel.native as native
from eanet.accel.ops._common import DTYPES, check, on_cpu
from eanet.accel.ops._register import kernel_op

_WORD_BITS = 16  # resolution of the keep probability


def _random_halves_fake(x: torch.Tensor) -> torch.Tensor:
    return torch.empty(x.shape, dtype=torch.int16, device=x.device)


@kernel_op("random_halves", fake=_random_halves_fake, seeded=True)
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
    if _native_masks(x):
        return _native_dropout(x, p)[0]
    return x * keep_mask(x.detach(), p)  # the mask is no function of x: no autograd node


def _native_masks(x: torch.Tensor) -> bool:
    """Whether kernels/dropout.c masks `x`: float32 or bfloat16 on the CPU, < 2^31 elements."""
    cpu = x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
    return cpu and x.numel() < 2**31 and native.available("dropout")


def threshold(p: float) -> int:
    """The kernels' 16-bit dropout threshold: drop where 16 random bits are below it."""
    return min(round(p * 2**16), 2**16 - 1)


def draw_seeds(p: float) -> torch.Tensor:
    """The two 32-bit seeds of a kernel's dropout draws with probability p, drawn from
    torch's generator; for p = 0 (nothing drawn, torch's generator untouched) zeros, a
    tensor of the caller's own to save or hand out."""
    if p > 0.0:
        return torch.randint(0, 2**32, (2,), dtype=torch.int64)
    return torch.zeros(2, dtype=torch.int64)


def drop_args(seeds: torch.Tensor, p: float) -> tuple[int, int, int]:
    """The kernels' (seed 1, seed 2, threshold) of a dropout with probability p (0: none)."""
    s1, s2 = (int(s) for s in seeds.tolist())
    return s1, s2, threshold(p) if p > 0.0 else 0


def _keep(x: torch.Tensor, seeds: torch.Tensor, p: float) -> torch.Tensor:
    """x where the counter-based draws of `seeds` keep it (probability 1 - p), else 0."""
    fits = on_cpu(x) and x.dtype in DTYPES and x.numel() < 2**31 and seeds.numel() == 2
    check("dropout", fits, "a CPU fp32 or bf16 tensor of < 2^31 elements, 2 seeds", x, seeds)
    x = x.contiguous()
    y = torch.empty_like(x)
    lib = native.library("dropout")
    fn = lib.keep_32bit if x.element_size() == 4 else lib.keep_16bit
    s1, s2 = (int(s) for s in seeds.tolist())
    t, n = threshold(p), x.numel()
    native.split_batch(lib, fn, (n + 1) // 2, x.data_ptr(), y.data_ptr(), s1, s2, t, n)
    return y


def _backward_fake(grad: torch.Tensor, seeds: torch.Tensor, p: float) -> torch.Tensor:
    return torch.empty_like(grad)


@kernel_op("dropout_cpu_backward", fake=_backward_fake)
def _native_dropout_backward(grad: torch.Tensor, seeds: torch.Tensor, p: float) -> torch.Tensor:
    """dL/dx: dL/dy under the same mask, recomputed from the seeds."""
    return _keep(grad, seeds, p)


def _fake(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty(2, dtype=torch.int64)


def _setup(ctx, inputs, output) -> None:
    ctx.p = inputs[1]
    ctx.save_for_backward(output[1])


def _grad(ctx, grad: torch.Tensor, _grad_seeds) -> tuple[torch.Tensor, None]:
    (seeds,) = ctx.saved_tensors
    return _native_dropout_backward(grad, seeds, ctx.p), None


@kernel_op("dropout_cpu", fake=_fake, backward=_grad, setup_context=_setup, seeded=True)
def _native_dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x masked, the two 32-bit seeds of its mask), seeds drawn from torch's generator."""
    seeds = torch.randint(0, 2**32, (2,), dtype=torch.int64)
    return _keep(x, seeds, p), seeds
