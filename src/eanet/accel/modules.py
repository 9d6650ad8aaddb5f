"""Faster equivalents of the model's layers, swapped in by `eanet.accel.apply`.

Each class here subclasses the plain layer of `eanet.models.layers` and adds no parameter
or buffer: `apply` changes a module's class in place (as torch's own `parametrize` does),
so parameter names, state dicts, checkpoints and `isinstance` checks stay the plain
model's, and `restore` changes the class back. Each computes the plain layer's function;
`tests/test_accel.py` compares the two models, outputs and gradients.

- `FoldedExternalAttention`: M_k follows the input projection and M_v precedes the output
  projection with nothing non-linear in between, and both are shared by every head, so
  each pair folds into one (dim x heads*S) matrix: two matmuls instead of four, no
  transposes; the input projection's bias left out (the softmax over the tokens removes
  it); the double normalisation by one kernel (`fused.double_normalize`); CPU inference a
  few images at a time (`external_attention_in_chunks`), so that the logits stay in the
  cache between the three steps.
- `FastSelfAttention`: torch's fused attention (SDPA) where no dropout is drawn or on
  CUDA; CPU training writes softmax(q k^T) out with the cheap dropout masks instead (SDPA
  draws its dropout with `bernoulli_` over (B, h, N, N)), in bf16 the softmax and its
  dropout in one kernel (`fused.softmax_dropout`), and CPU bf16 inference a few images at
  a time (`attention_in_chunks`).
- `FastMlp`: the tanh GELU kernel with the dropout after it inside its pass, the cheap
  dropout masks after fc2, both rescales folded into fc2.
- `FusedBlocks`: the block sequence with each block's last residual add left to the next
  block's LayerNorm, so that under CPU bf16 autocast the add and the norm run in one
  kernel pass (`fused.add_layer_norm`), in inference written over the stream the blocks
  made themselves, and in training with the branch's last dropout (the projection's, the
  MLP's) inside that pass each way (`branch` gives a layer's output before it).

Each class states what it supports (`FastLayer`: `unsupported(module)` gives the reason a
module must stay plain, `supports(module)` the yes or no): the exact plain class, and the
children and attributes its fast path reads in place of calling them (a MLP's GELU and its
`approximate`, the linear layers and the biases folded or split off, `nn.Dropout`'s `p`,
a block's LayerNorms). `apply` swaps only what is supported and reports the rest.

On the CPU the dropout masks are drawn differently from `nn.Dropout` (a counter-based
generator, `fused.masked`): each run is deterministic under its seed, but the plain and
the applied model draw different masks from the same seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eanet.accel.fused import (
    add_layer_norm,
    double_normalize,
    double_normalize_into,
    gelu_tanh,
    layer_norm,
    masked,
    softmax_dropout,
    softmax_last_into,
    with_bias,
)
from eanet.accel.upstream import has_forward_hooks, has_hooks
from eanet.models.layers import Block, ExternalAttention, Mlp, SelfAttention, drop_path
from eanet.runtime import cpu_info

CHUNK_BYTES = 1 << 21  # attention weights (logits) of one chunk of images: about 2 MB
# (out, p, bias): a block's branch is masked(out + bias, p), bias None meaning none
Branch = tuple[torch.Tensor, float, torch.Tensor | None]


class FastLayer:
    """The contract of a faster class with `apply`: which modules it computes the function of.

    A faster class subclasses one plain class (`plain_class`) and reads some of a module's
    children and attributes instead of calling them (folded weights, split-off biases, a dropout's
    `p`); `unsupported` checks exactly those, so that a module a user changed (another
    activation, a linear layer without its bias, a subclass with its own forward, a hook on
    a child the fast path skips) stays plain instead of computing something else.
    """

    plain_class: type[nn.Module]  # the plain class this one stands in for

    @classmethod
    def unsupported(cls, module: nn.Module) -> str | None:
        """Why `module` must stay plain (the first reason found); None where it is supported."""
        plain = cls.plain_class
        if type(module) is not plain:
            return f"{type(module).__name__} is not the plain {plain.__name__} (its own code)"
        own = sorted(n for n in vars(module) if callable(getattr(plain, n, None)))
        if own:
            return f"{', '.join(own)} set on the instance"
        return cls.unsupported_parts(module)

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        """Whether this class computes `module`'s function (`unsupported` gives the reason)."""
        return cls.unsupported(module) is None

    @classmethod
    def unsupported_parts(cls, module: nn.Module) -> str | None:
        """The class's own checks of the children and attributes its fast path reads."""
        raise NotImplementedError


def _exactly(module: nn.Module, name: str, kind: type[nn.Module]) -> str | None:
    """None where `module.<name>` is exactly a `kind` without hooks (the fast paths read
    its attributes instead of calling it, so a subclass or a hook would be skipped)."""
    child = getattr(module, name, None)
    if type(child) is not kind:
        return f"{name} is {type(child).__name__}, not {kind.__name__}"
    if has_hooks(child):
        return f"{name} has hooks, which the fast path would skip"
    return None


def _linear(
    module: nn.Module, name: str, sizes: tuple[int, int] | None = None, bias: bool = False
) -> str | None:
    """None where `module.<name>` is a plain nn.Linear mapping sizes (in, out) where given,
    with a bias where `bias` (the fast path reads it)."""
    if reason := _exactly(module, name, nn.Linear):
        return reason
    linear = getattr(module, name)
    shape = tuple(linear.weight.shape[::-1])
    if sizes is not None and shape != sizes:
        return f"{name} maps {shape[0]} -> {shape[1]}, not {sizes[0]} -> {sizes[1]}"
    if bias and linear.bias is None:
        return f"{name} has no bias"
    return None


def _sizes(module: nn.Module, *names: str) -> str | None:
    """None where each of `module`'s `names` is a positive int (the views' axis sizes)."""
    for name in names:
        value = getattr(module, name, None)
        if type(value) is not int or value < 1:
            return f"{name}={value!r} is not a positive int"
    return None


def _first(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r is not None), None)


def cached_fold(module: nn.Module, fold) -> tuple[torch.Tensor, ...]:
    """`fold()` (weights derived from `module`'s parameters), computed once while the
    parameters hold the same values, in CPU inference, and kept in the autocast dtype where
    autocast is on (as autocast would cast them at every call), one copy per dtype (a server
    may run small passes in fp32 and large ones in bf16); afresh with gradients (they flow
    through the fold), under torch.compile (whose guards on the cache would recompile the
    graph) and on CUDA (see below). The fold itself runs in the parameters' fp32 (autocast
    off: one rounding to bf16 at the end, not of each factor).

    The cache is checked against a copy of the parameters' values at every call, not
    against their version counters: a write through `p.data` (`p.data.copy_(new)`) changes
    the values but bumps no counter, and the model served the old weights. On CUDA that
    check would synchronise the device once per layer, so the fold (a few small kernels)
    runs afresh there instead."""
    params = tuple(module.parameters())
    device = params[0].device.type
    if torch.is_grad_enabled() or torch.compiler.is_compiling() or device != "cpu":
        with torch.autocast(device, enabled=False):
            return fold()
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    folds = module.__dict__.setdefault("_folded", {})  # dtype -> (parameter values, fold)
    cached = folds.get(dtype)
    if cached is None or not _same_values(cached[0], params):
        with torch.autocast(device, enabled=False):
            folded = tuple(w.to(dtype) if dtype else w.clone() for w in fold())
        values = tuple(p.detach().clone() for p in params)
        folds[dtype] = cached = (values, folded)
    return cached[1]


def _same_values(values: tuple[torch.Tensor, ...], params: tuple[torch.Tensor, ...]) -> bool:
    """Whether the parameters still hold `values` (shapes, dtypes and every element)."""
    return len(values) == len(params) and all(
        v.dtype == p.dtype and torch.equal(v, p) for v, p in zip(values, params, strict=True)
    )


def empty(x: torch.Tensor) -> bool:
    """Whether `x` has no element (no image, or no token): the faster layers then run the
    plain layer's ops, which give the plain model's empty outputs, where the kernels, the
    chunk sizes and views with an inferred (-1) width assume at least one element."""
    return x.numel() == 0


def torch_dropout(x: torch.Tensor) -> bool:
    """Whether `x` takes torch's own dropout: on CUDA, not on the CPU.

    The cheap masks of `fused.masked` exist because `bernoulli_` dominated the CPU step; on
    a GPU `F.dropout` draws and applies its mask in one fused kernel, where the mask trick
    takes three (random words, comparison, multiplication), and torch's fused attention
    kernels draw their own dropout.
    """
    return x.is_cuda


class FoldedExternalAttention(ExternalAttention, FastLayer):
    """External attention with M_k and M_v folded into the projections (same function)."""

    plain_class = ExternalAttention

    @classmethod
    def unsupported_parts(cls, module: nn.Module) -> str | None:
        """The four linear layers (folded, so never called; proj_in's and proj's biases
        read), both dropouts' `p`, and the head and memory sizes of the views."""
        if reason := _sizes(module, "heads", "head_dim", "memory", "inner"):
            return reason
        h, d, S, inner = module.heads, module.head_dim, module.memory, module.inner
        if h * d != inner:
            return f"heads * head_dim = {h * d}, not inner = {inner}"
        dim = getattr(getattr(module, "proj_in", None), "in_features", None)
        out = getattr(getattr(module, "proj", None), "out_features", None)
        return _first(
            _linear(module, "proj_in", (dim, inner), bias=True),
            _linear(module, "mk", (d, S)),
            _linear(module, "mv", (S, d)),
            _linear(module, "proj", (inner, out), bias=True),
            _exactly(module, "attn_drop", nn.Dropout),
            _exactly(module, "proj_drop", nn.Dropout),
        )

    def folded_weights(self) -> tuple[torch.Tensor, ...]:
        """(w_in, b_in, w_out, b_out): proj_in then M_k, and M_v then proj, as single linears."""
        h, d, S = self.heads, self.head_dim, self.memory
        wk, wv = self.mk.weight, self.mv.weight  # (S, d), (d, S)
        w_in = torch.einsum("hdi,sd->hsi", self.proj_in.weight.view(h, d, -1), wk)
        b_in = self.proj_in.bias.view(h, d) @ wk.t()  # (h, S)
        w_out = torch.einsum("ohd,ds->ohs", self.proj.weight.view(-1, h, d), wv)
        b_out = self.proj.bias
        if self.mk.bias is not None:
            b_in = b_in + self.mk.bias
        if self.mv.bias is not None:
            b_out = b_out + self.proj.weight.view(-1, h, d).sum(1) @ self.mv.bias
        return w_in.reshape(h * S, -1), b_in.reshape(-1), w_out.reshape(-1, h * S), b_out

    def folded_weights_cached(self) -> tuple[torch.Tensor, ...]:
        return cached_fold(self, self.folded_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, p, _ = self.branch(x, split_bias=False)
        return masked(out, p)

    def branch(self, x: torch.Tensor, split_bias: bool = True) -> Branch:
        """(out, p, bias): the forward is masked(out + bias, p), p the dropout still to draw
        (0: none) and bias the output projection's bias still to add (None where not
        `split_bias`, and on CUDA), which `FusedBlocks` adds and draws inside the next
        residual add instead: there torch's linear would first fill its whole output with
        the bias and, in training, sum its gradient in a pass of its own (`split_bias`)."""
        if empty(x):
            return ExternalAttention.forward(self, x), 0.0, None  # see `empty`
        B, N, _ = x.shape
        w_in, b_in, w_out, b_out = self.folded_weights_cached()
        # b_in shifts every token's logit in a column alike, which the softmax over the tokens
        # removes: z goes without it (no bias pass, and no bias-gradient sum in training),
        # and its parameters get the exact gradient, 0, through b_out.
        if torch.is_grad_enabled():
            b_out = b_out + 0.0 * b_in.sum()
        if not self.training and in_cache_chunks(x, N * self.heads * self.memory):
            bias = None if split_bias else b_out
            out = external_attention_in_chunks(x, self.heads, self.memory, w_in, w_out, bias)
            return out, 0.0, b_out if split_bias else None
        z = F.linear(x, w_in).view(B, N, self.heads, self.memory)  # (B, N, h, S)
        if torch_dropout(x):  # torch's dropout, which rescales by itself
            attn = double_normalize(z, token_dim=1).view(B, N, -1)  # (B, N, h*S)
            return self.proj_drop(F.linear(self.attn_drop(attn), w_out, b_out)), 0.0, None
        p1 = self.attn_drop.p if self.training else 0.0
        p2 = self.proj_drop.p if self.training else 0.0
        s1, s2 = 1.0 / (1.0 - p1), 1.0 / (1.0 - p2)  # dropout rescales, folded into w_out
        attn = double_normalize(z, token_dim=1, p=p1).view(B, N, -1)  # dropout inside
        out, bias = _last_linear(attn, w_out, b_out, s1 * s2, s2, split_bias)
        return out, p2, bias


def _last_linear(h, weight, bias, weight_scale, bias_scale, split_bias):
    """(linear(h), its bias) with the dropout rescales folded in (scale 1: the parameters
    themselves), the bias left out where `split_bias`: (out, None) or (out without the bias,
    the bias)."""
    if weight_scale != 1.0 or bias_scale != 1.0:
        weight, bias = weight * weight_scale, bias * bias_scale
    return (F.linear(h, weight), bias) if split_bias else (F.linear(h, weight, bias), None)


def bias_in_gelu(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the MLP leaves fc1's bias to the GELU kernel: CPU inference (eval mode, no
    gradient, eager), where torch's linear would first fill its whole output with the bias
    (a pass of its own, as for the last biases, left to the add + LayerNorm kernel); the GELU
    kernel adds it in the pass it makes anyway."""
    eager = not torch.compiler.is_compiling()
    return not module.training and not torch.is_grad_enabled() and x.is_cpu and eager


def chunk_images(x: torch.Tensor, logits_per_image: int) -> int:
    """Images per chunk of CPU inference over `x`: about CHUNK_BYTES of logits."""
    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast and x.is_floating_point() else x.dtype
    return max(1, CHUNK_BYTES // max(1, logits_per_image * dtype.itemsize))


def in_cache_chunks(x: torch.Tensor, logits_per_image: int) -> bool:
    """Whether attention over `x` runs a few images at a time: CPU inference of more images
    than one chunk, outside torch.compile (in training the whole tensors are kept for the
    backward anyway, and compiled code fuses its own loops)."""
    eager = not torch.compiler.is_compiling()
    no_grad = not torch.is_grad_enabled()
    return x.is_cpu and no_grad and eager and len(x) > chunk_images(x, logits_per_image)


def external_attention_in_chunks(x, heads, memory, w_in, w_out, b_out=None) -> torch.Tensor:
    """The folded external attention without gradients, a few images at a time, so that
    each chunk's (n, N, heads*memory) logits stay in the cache between the input projection,
    the double normalisation and the output projection instead of going through memory.
    The weights are in the dtype to compute in (`cached_fold`): each chunk's output is
    written straight into its rows of the result. The input projection has no bias: it
    would add the same to every token's logit in a column, which the softmax over the
    tokens takes out again; the output projection's, b_out, is left to the caller where
    None. One chunk's logits and weights go into buffers reused by the next, the double
    normalisation's kernel called straight (`fused.double_normalize_into`), without an
    autograd function's or a fresh tensor's overhead per chunk."""
    B, N, D = x.shape
    step = chunk_images(x, N * heads * memory)
    x = x.to(w_in.dtype)
    out = x.new_empty(B * N, w_out.shape[0])
    logits = x.new_empty(min(step, B) * N, heads * memory)  # one chunk's, reused
    weights = torch.empty_like(logits)
    for i in range(0, B, step):
        n = len(xc := x[i : i + step])
        z = torch.mm(xc.reshape(n * N, D), w_in.t(), out=logits[: n * N])
        z = z.view(n, N, heads, memory)
        attn = double_normalize_into(z, weights[: n * N].view_as(z)).view(n * N, -1)
        rows = out[i * N : (i + n) * N]
        if b_out is None:
            torch.mm(attn, w_out.t(), out=rows)
        else:
            torch.addmm(b_out, attn, w_out.t(), out=rows)
    return out.view(B, N, -1)


class FastSelfAttention(SelfAttention, FastLayer):
    """Self-attention with q, k, v as one linear (the 1/sqrt(key_dim) scale folded into q's
    weights), by torch's fused kernel, with cheap dropout masks in CPU training, or in
    chunks of images in CPU bf16 inference where the CPU has no AMX (`chunked_attention`)."""

    plain_class = SelfAttention

    @classmethod
    def unsupported_parts(cls, module: nn.Module) -> str | None:
        """q, k, v (stacked into one linear, biases included), proj (its weight and bias
        read), the dropout's `p`, and the head sizes of the views."""
        if reason := _sizes(module, "heads", "key_dim"):
            return reason
        inner = module.heads * module.key_dim
        dim = getattr(getattr(module, "q", None), "in_features", None)
        out = getattr(getattr(module, "proj", None), "out_features", None)
        return _first(
            *(_linear(module, name, (dim, inner), bias=True) for name in ("q", "k", "v")),
            _linear(module, "proj", (inner, out)),
            _exactly(module, "attn_drop", nn.Dropout),
        )

    def fused_qkv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) of the q (scaled), k and v projections stacked: (3*h*kd, dim)."""
        s = self.key_dim**-0.5
        weight = torch.cat([self.q.weight * s, self.k.weight, self.v.weight])
        return weight, torch.cat([self.q.bias * s, self.k.bias, self.v.bias])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if empty(x):
            return super().forward(x)  # see `empty`
        B, N, _ = x.shape
        qkv = F.linear(x, *cached_fold(self, self.fused_qkv))  # (B, N, 3*h*kd)
        qkv = qkv.view(B, N, 3, self.heads, self.key_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, h, N, kd) each, q already scaled
        p = self.attn_drop.p if self.training else 0.0
        weight = self.proj.weight
        if p > 0.0 and not torch_dropout(x):
            w = softmax_dropout(q @ k.transpose(-2, -1), p)
            out = w @ v  # (B, h, N, kd); the dropout rescale folded into proj
            weight = weight * (1.0 / (1.0 - p))
        elif p == 0.0 and not q.requires_grad and chunked_attention(q):
            out = attention_in_chunks(q, k, v)
        else:  # (B, h, N, kd); the scale 1/sqrt(kd) of Keras is in q already
            out = F.scaled_dot_product_attention(q, k, v, dropout_p=p, scale=1.0)
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.key_dim)
        return F.linear(out, weight, self.proj.bias)


def chunked_attention(q: torch.Tensor) -> bool:
    """Whether `attention_in_chunks` is faster than torch's fused kernel for `q`: bf16 on a
    CPU without AMX. Measured side by side in the ViT's inference (batch 128): without AMX
    the fused kernel ran bf16 slower than fp32 and the chunks won; with AMX the fused kernel
    was faster than the chunks."""
    return q.dtype == torch.bfloat16 and q.is_cpu and "amx_bf16" not in cpu_info()[1]


def attention_in_chunks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T) v for bf16 (B, h, N, d) on the CPU (q scaled), without gradients, a
    few images at a time so that each chunk's (h, N, N) weights stay in the cache.

    The plain model's ops under CPU bf16 autocast (bf16 logits, softmax in fp32 inside and
    bf16 out, by `fused.softmax_last_into`), where torch's fused attention (SDPA) was slower
    in bf16 than in fp32 on a CPU with avx512_bf16 but without AMX; one chunk's logits and
    weights in buffers reused by the next, the softmax kernel called straight into them.
    """
    B, h, N, _ = q.shape
    step = chunk_images(q, h * N * N)
    out = torch.empty_like(q)
    logits = q.new_empty(min(step, B), h, N, N)  # one chunk's, reused
    weights = torch.empty_like(logits)
    for i in range(0, B, step):
        # k's rows made contiguous first (they are every third slice of the qkv output): the
        # batched q k^T runs faster on the copy than on the strided k.
        kt = k[i : i + step].contiguous().transpose(-2, -1)
        w = torch.matmul(q[i : i + step], kt, out=logits[: len(kt)])
        w = softmax_last_into(w, weights[: len(w)])
        torch.matmul(w, v[i : i + step], out=out[i : i + step])
    return out


class FastMlp(Mlp, FastLayer):
    """The MLP with the GELU kernel (its dropout inside) and cheap dropout masks (CPU);
    torch's ops on CUDA."""

    plain_class = Mlp

    @classmethod
    def unsupported_parts(cls, module: nn.Module) -> str | None:
        """fc1 (its weight and bias read in inference), the GELU (its `approximate` read:
        the tanh one runs as a kernel), fc2 (its weight and bias read, rescaled) and the
        dropout's `p`."""
        hidden = getattr(getattr(module, "fc1", None), "out_features", None)
        out = getattr(getattr(module, "fc2", None), "out_features", None)
        if reason := _first(
            _linear(module, "fc1"),
            _exactly(module, "act", nn.GELU),
            _linear(module, "fc2", (hidden, out), bias=True),
            _exactly(module, "drop", nn.Dropout),
        ):
            return reason
        if module.act.approximate not in ("tanh", "none"):
            return f"act.approximate={module.act.approximate!r} is neither 'tanh' nor 'none'"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, p, _ = self.branch(x, split_bias=False)
        return masked(out, p)

    def branch(self, x: torch.Tensor, split_bias: bool = True) -> Branch:
        """(out, p, bias): the forward is masked(out + bias, p), fc2's bias left to the
        caller where `split_bias` (see FoldedExternalAttention.branch); in CPU inference
        fc1's bias goes into the GELU kernel (`bias_in_gelu`)."""
        if torch_dropout(x) or empty(x):  # empty: see `empty`
            return super().forward(x), 0.0, None
        p = self.drop.p if self.training else 0.0
        s = 1.0 / (1.0 - p)  # both dropout rescales folded into fc2
        tanh = self.act.approximate == "tanh"
        if tanh and bias_in_gelu(self, x):
            h = gelu_tanh(F.linear(x, self.fc1.weight), 0.0, self.fc1.bias)
        else:
            h = self.fc1(x)
            h = gelu_tanh(h, p) if tanh else masked(self.act(h), p)
        out, bias = _last_linear(h, self.fc2.weight, self.fc2.bias, s * s, s, split_bias)
        return out, p, bias


class FusedBlocks(nn.Sequential, FastLayer):
    """The blocks in sequence, each block's last residual add run inside the next LayerNorm,
    and each branch's last dropout inside the residual add that follows it.

    Where a block carries hooks (a user watching its input or output), the blocks run one
    by one as plain modules, so the hooks see what they would see in the plain model.
    """

    plain_class = nn.Sequential

    @classmethod
    def unsupported_parts(cls, module: nn.Module) -> str | None:
        """Every element a `Block` computing `Block.forward` (which `_block_parts` writes out:
        x + drop_path(attn(norm1(x))), then the same with mlp and norm2), with plain
        LayerNorms (their weight, bias and eps read by the kernels), a numeric `drop_path`,
        and its attention and MLP modules (any: a plain one is called)."""
        if len(module) == 0:
            return "no blocks"
        for i, block in enumerate(module):
            if reason := _block_unsupported(block):
                return f"block {i}: {reason}"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if empty(x) or any(has_forward_hooks(block) for block in self):
            return super().forward(x)  # empty: see `empty`
        pending = None  # the previous block's last branch, its bias and dropout not yet added
        for i, block in enumerate(self):
            x, pending = _block_parts(block, x, pending, owned=i > 0)
        if pending is None:
            return x
        out, p, bias = pending
        return x + masked(with_bias(out, bias), p)


def _block_unsupported(block: nn.Module) -> str | None:
    """Why `FusedBlocks` cannot write out `block`'s forward (None where it can)."""
    if not isinstance(block, Block):
        return f"{type(block).__name__} is not a Block"
    if type(block).forward is not Block.forward or "forward" in vars(block):
        return f"{type(block).__name__} has its own forward"
    if type(block.drop_path) not in (int, float):
        return f"drop_path={block.drop_path!r} is not a number"
    if not all(isinstance(getattr(block, n, None), nn.Module) for n in ("attn", "mlp")):
        return "attn or mlp is not a module"
    return _first(_exactly(block, "norm1", nn.LayerNorm), _exactly(block, "norm2", nn.LayerNorm))


def _block_parts(
    block: Block, x: torch.Tensor, pending: Branch | None, owned: bool
) -> tuple[torch.Tensor, Branch]:
    """(stream, branch): `block` applied to x + masked(*pending) is stream + masked(*branch).
    `owned`: x is a stream this sequence made itself, which the adds may overwrite (never
    the input)."""
    x, h = _add_norm(block.norm1, x, pending, owned)
    x, h = _add_norm(block.norm2, x, _branch(block, block.attn, h), owned or pending is not None)
    return x, _branch(block, block.mlp, h)


def _branch(block: Block, module: nn.Module, h: torch.Tensor) -> Branch:
    """(out, p, bias) of `module` (the block's attention or MLP) on h, stochastic depth
    applied (it commutes with the dropout: each multiplies elementwise by its own draws); a
    module with hooks is called, so that they see its whole output. Where stochastic depth
    draws (training, drop_path > 0) it scales the whole branch, its last bias too, so the
    bias stays in the linear layer (split off, it had been added unscaled: another function
    and another bias gradient than the plain block's)."""
    split = isinstance(module, FoldedExternalAttention | FastMlp)
    if split and not has_forward_hooks(module):
        depth = block.training and block.drop_path != 0.0
        out, p, bias = module.branch(h, split_bias=not depth)
    else:
        out, p, bias = module(h), 0.0, None
    return drop_path(out, block.drop_path, block.training), p, bias


def _add_norm(
    norm: nn.LayerNorm, x: torch.Tensor, residual: Branch | None, owned: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, norm(s)), s = x + masked(*residual), residual None meaning 0; the sum written
    over x where this sequence owns x and no gradient is wanted."""
    if residual is None:
        return x, layer_norm(norm, x)
    out, p, bias = residual
    return add_layer_norm(norm, x, out, in_place=owned, p=p, bias=bias)


# plain layer -> its faster equivalent, and which devices it pays on
SWAPS: dict[type[nn.Module], tuple[type[nn.Module], tuple[str, ...]]] = {
    ExternalAttention: (FoldedExternalAttention, ("cpu", "cuda")),
    SelfAttention: (FastSelfAttention, ("cpu", "cuda")),
    Mlp: (FastMlp, ("cpu",)),
}
