"""The blocks' LayerNorms under CPU bf16 autocast, by kernels/layer_norm.c.

`layer_norm` and `add_layer_norm` (the second with the residual add before it, and the
branch's last bias and dropout inside) read the fp32 stream and write bf16 in one pass each
way, where torch converts and normalises in passes of their own; elsewhere torch's. They
stay out of compiled graphs: inductor fuses the norm with its neighbours itself."""

from __future__ import annotations

import torch

import eanet.accel.native as native
from eanet.accel.ops._common import check, fits_rows, fp32, on_cpu, ptr, with_bias
from eanet.accel.ops._register import kernel_op
from eanet.accel.ops.dropout import draw_seeds, drop_args, masked


def _norm_to_bf16(x: torch.Tensor) -> bool:
    """Whether LayerNorm's result goes straight into bfloat16 matmuls: CPU bf16 autocast."""
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _native_norm_applies(norm: torch.nn.LayerNorm, x: torch.Tensor) -> bool:
    """Whether kernels/layer_norm.c computes `norm(x)`: an affine LayerNorm over the last
    axis of fp32 `x` on the CPU, outside torch.compile (whose own code fuses the norm with
    its neighbours), where the result is wanted in bfloat16."""
    affine = norm.weight is not None and norm.bias is not None and len(norm.normalized_shape) == 1
    # x's last axis must be the normalised one: otherwise torch's own error, not the kernel's
    affine = affine and x.dim() >= 1 and x.shape[-1] == norm.normalized_shape[0] > 0
    affine = affine and norm.weight.shape == norm.bias.shape == norm.normalized_shape
    cpu = x.device.type == "cpu" and x.dtype == torch.float32
    return (
        affine
        and cpu
        and norm.weight.dtype == torch.float32
        and x.numel() < 2**31
        and _norm_to_bf16(x)
        and not torch.compiler.is_compiling()
        and native.available("layer_norm")
    )


def _norm_forward(
    x,
    residual,
    weight,
    bias,
    eps: float,
    bf16_out: bool,
    in_place: bool = False,
    drop=(0, 0, 0),
    residual_bias=None,
):
    """(x + residual or None, y, mean, 1/std) by kernels/layer_norm.c; with `in_place`, the
    sum is written over x itself (contiguous x), which is returned as the stream; `drop`,
    the kernels' (seed 1, seed 2, threshold) of the residual's dropout (`drop_args`);
    `residual_bias` (fp32, (D,)), a bias added to each of the residual's rows."""
    _check_norm(x, weight, bias)
    if residual_bias is not None:
        _check_norm(x, residual_bias)
    fits = residual is None or (residual.shape == x.shape and residual.dtype == torch.bfloat16)
    check("layer_norm", fits, "a bf16 residual shaped as x", x, residual)
    check("layer_norm", not in_place or x.is_contiguous(), "a contiguous x in place", x)
    x, D = x.contiguous(), x.shape[-1]
    rows = x.numel() // D
    stream = None if residual is None else x if in_place else torch.empty_like(x)
    residual = None if residual is None else residual.contiguous()
    y = torch.empty(x.shape, dtype=torch.bfloat16 if bf16_out else x.dtype)
    mean = torch.empty(rows, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    if residual_bias is not None:
        residual_bias = residual_bias.contiguous()
    tensors = (x, residual, residual_bias, weight.contiguous(), bias.contiguous(), stream, y)
    tensors = (*tensors, mean, rstd)
    lib = native.library("layer_norm")
    args = (*map(ptr, tensors), int(bf16_out), D, eps, *drop)
    native.split_batch(lib, lib.ln_forward, rows, *args)
    return stream, y, mean, rstd


def _check_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
    """fp32 x (..., D), D > 0, and fp32 weight and bias of shape (D,), all on the CPU."""
    D = x.shape[-1] if x.dim() else 0
    params = [p for p in (weight, bias) if p is not None]
    fits = all(p.shape == (D,) and p.dtype == torch.float32 for p in params)
    fits = fits and on_cpu(x, *params) and x.dtype == torch.float32 and D > 0
    check("layer_norm", fits, "CPU fp32 x (..., D) and fp32 weight and bias (D,)", x, *params)


def _norm_fake(x, bf16_out: bool):
    rows = x.numel() // x.shape[-1]
    y = torch.empty(x.shape, dtype=torch.bfloat16 if bf16_out else x.dtype)
    return y, x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


def _backward_fake(grad, grad_stream, x, weight, mean, rstd, residual_grad, seeds, p):
    grad_h = torch.empty(x.shape if residual_grad else 0, dtype=torch.bfloat16)
    return torch.empty_like(x), grad_h, *(torch.empty_like(weight) for _ in range(3))


@kernel_op("layer_norm_cpu_backward", fake=_backward_fake)
def _native_layer_norm_backward(
    grad: torch.Tensor,
    grad_stream: torch.Tensor | None,
    x: torch.Tensor,
    weight: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    residual_grad: bool,
    seeds: torch.Tensor,
    p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dL/dx, dL/dresidual in bf16 (empty without one; 0 where the residual's dropout of
    `seeds` and p dropped it), dL/dweight, dL/dbias, dL/dresidual's rows summed in fp32 (the
    gradient of a bias added to the residual; zeros without one)) from dL/dy (fp32 or bf16)
    and, for the add, the residual stream's own gradient (fp32)."""
    _check_norm(x, weight)
    rows = x.numel() // x.shape[-1]
    stats = all(t.shape == (rows,) and t.dtype == torch.float32 for t in (mean, rstd))
    grads = grad.shape == x.shape and (grad_stream is None or grad_stream.shape == x.shape)
    fits = on_cpu(grad, grad_stream, mean, rstd, seeds) and grads and stats
    fits = fits and seeds.numel() == 2 and 0.0 <= p < 1.0
    need = "CPU gradients shaped as x, fp32 statistics (rows,), 2 seeds"
    check("layer_norm", fits, need, grad, grad_stream, x, mean, rstd, seeds)
    if grad.dtype != torch.bfloat16:
        grad = grad.float()
    grad, x, D = grad.contiguous(), x.contiguous(), x.shape[-1]
    grad_stream = None if grad_stream is None else grad_stream.float().contiguous()
    mean, rstd = mean.contiguous(), rstd.contiguous()
    lib = native.library("layer_norm")
    blocks = -(-rows // lib.ln_block_rows())
    grad_x, part = torch.empty_like(x), torch.empty((blocks, 3, D), dtype=torch.float32)
    grad_h = torch.empty(x.shape if residual_grad else 0, dtype=torch.bfloat16)
    tensors = (grad, grad_stream, x, weight.contiguous(), mean, rstd, grad_x)
    ptrs = [*map(ptr, tensors), grad_h.data_ptr() if residual_grad else None, part.data_ptr()]
    g_bf16 = int(grad.dtype == torch.bfloat16)
    drop = drop_args(seeds, p)
    native.split_batch(lib, lib.ln_backward, blocks, *ptrs, g_bf16, D, rows, *drop)
    return grad_x, grad_h, *(part[:, j].sum(0) for j in range(3))  # three tensors, no views


def _layer_norm_fake(x, weight, bias, eps, bf16_out):
    return _norm_fake(x, bf16_out)


def _norm_setup(ctx, inputs, output) -> None:
    x, weight = inputs[0], inputs[1]
    ctx.save_for_backward(x, weight, output[1], output[2])


def _norm_grad(ctx, grad, _grad_mean, _grad_rstd):
    saved, no_drop = ctx.saved_tensors, (draw_seeds(0.0), 0.0)
    grad_x, _, grad_w, grad_b, _ = _native_layer_norm_backward(grad, None, *saved, False, *no_drop)
    return grad_x, grad_w, grad_b, None, None


@kernel_op("layer_norm_cpu", fake=_layer_norm_fake, backward=_norm_grad, setup_context=_norm_setup)
def _native_layer_norm(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float, bf16_out: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, mean, 1/std) of LayerNorm over fp32 x's last axis: kernels/layer_norm.c."""
    return _norm_forward(x, None, weight, bias, eps, bf16_out)[1:]


def _add_fake(x, residual, residual_bias, weight, bias, eps, p):
    return (torch.empty_like(x), *_norm_fake(x, True), torch.empty(2, dtype=torch.int64))


def _add_norm_setup(ctx, inputs, output) -> None:
    ctx.p, ctx.residual_bias = inputs[6], inputs[2] is not None
    ctx.save_for_backward(output[0], inputs[3], output[2], output[3], output[4])


def _add_norm_grad(ctx, grad_stream, grad, _grad_mean, _grad_rstd, _grad_seeds):
    s, weight, mean, rstd, seeds = ctx.saved_tensors
    grad_x, grad_h, grad_w, grad_b, grad_hb = _native_layer_norm_backward(
        grad, grad_stream, s, weight, mean, rstd, True, seeds, ctx.p
    )
    grad_hb = grad_hb if ctx.residual_bias else None
    return grad_x, grad_h, grad_hb, grad_w, grad_b, None, None


@kernel_op(
    "add_layer_norm_cpu",
    fake=_add_fake,
    backward=_add_norm_grad,
    setup_context=_add_norm_setup,
    seeded=True,
)
def _native_add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    residual_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
    p: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(s = x + masked(residual + residual_bias, p) in fp32, LayerNorm(s) in bf16, mean,
    1/std, the two seeds of the residual's dropout), in one pass; residual_bias fp32 (D,) or
    None."""
    check("layer_norm", 0.0 <= p < 1.0, "a dropout 0 <= p < 1", residual)
    seeds = draw_seeds(p)
    drop = drop_args(seeds, p)
    args = (x, residual, weight, bias, eps, True)
    return (*_norm_forward(*args, drop=drop, residual_bias=residual_bias), seeds)


def _add_in_place_fake(x, residual, residual_bias, weight, bias, eps):
    return _norm_fake(x, True)[0]


# inference only: no autograd
@kernel_op("add_layer_norm_cpu_", fake=_add_in_place_fake, mutates_args=("x",))
def _native_add_layer_norm_(
    x: torch.Tensor,
    residual: torch.Tensor,
    residual_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor,
    eps: float,
) -> torch.Tensor:
    """LayerNorm(s) in bf16 with s = x + residual (+ residual_bias, fp32 (D,), on each row)
    written over x (inference: no backward)."""
    return _norm_forward(
        x, residual, weight, bias, eps, True, in_place=True, residual_bias=residual_bias
    )[1]


def layer_norm(norm: torch.nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """norm(x); under CPU bf16 autocast by kernels/layer_norm.c with the result in bfloat16
    (what the next linear layer would cast it to), in one pass each way."""
    if _native_norm_applies(norm, x):
        return _native_layer_norm(x, norm.weight, norm.bias, norm.eps, True)[0]
    return norm(x)


def add_layer_norm(
    norm: torch.nn.LayerNorm,
    x: torch.Tensor,
    residual: torch.Tensor,
    in_place: bool = False,
    p: float = 0.0,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)) with s = x + masked(residual + bias, p): a block's residual add (its
    branch's last bias, where the branch left it out, and its dropout, no rescale, first) and
    the next pre-norm. Under CPU bf16 autocast (fp32 stream x, bf16 branch output) in one
    kernel pass each way, the dropout inside, and in inference the bias too.
    `in_place` lets it write s over x where no gradient is wanted (the caller owns x): no
    second stream to write where x is not in the cache."""
    fused = residual.dtype == torch.bfloat16 and residual.shape == x.shape
    if fused and residual.device == x.device and _native_norm_applies(norm, x):
        w, b, eps = norm.weight, norm.bias, norm.eps
        owned = in_place and x.is_contiguous()
        fits = fits_rows(bias, x)
        inference = not torch.is_grad_enabled() and p == 0.0 and fits
        if inference and (owned or bias is not None):  # the bias inside (a copy of x if not owned)
            x = x if owned else x.clone(memory_format=torch.contiguous_format)
            return x, _native_add_layer_norm_(x, residual, fp32(bias), w, b, eps)
        if not fits:
            residual, bias = with_bias(residual, bias), None
        s, y, *_ = _native_add_layer_norm(x, residual, fp32(bias), w, b, eps, p)
        return s, y
    s = x + masked(with_bias(residual, bias), p)
    return s, layer_norm(norm, s)
