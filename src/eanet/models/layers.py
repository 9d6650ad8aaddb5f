"""The layers of the encoder, each as the Keras example builds it, with its fast path beside it.

Normalization (pixel space, Keras `Normalization`), patch embedding, external attention
(EANet), multi-head self-attention (ViT), the MLP and the pre-norm block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from eanet.models.config import ModelConfig
from eanet.models.fused import add_layer_norm, double_normalize, gelu_tanh, layer_norm, masked


def native_dropout(x: torch.Tensor) -> bool:
    """Whether the fast paths use torch's own dropout for `x`: on CUDA, not on the CPU.

    The cheap masks of `fused.masked` exist because `bernoulli_` dominated the CPU step; on
    a GPU `F.dropout` draws and applies its mask in one fused kernel, where the mask trick
    takes three (random words, comparison, multiplication), and torch's fused attention
    kernels draw their own dropout.
    """
    return x.is_cuda


class Normalize(nn.Module):
    """Keras `Normalization`: (x - mean) / max(sqrt(var), 1e-7), per channel, pixel space."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        # Neutral until set from the training data (mean 0, var 1 leaves inputs unchanged).
        self.register_buffer("mean", torch.zeros(channels))
        self.register_buffer("var", torch.ones(channels))
        self.register_buffer("count", torch.zeros((), dtype=torch.int64))

    def set_stats(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        self.mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.var.copy_(torch.as_tensor(var, dtype=torch.float32))
        self.count.fill_(int(count))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        std = self.var.sqrt().clamp_min(1e-7)
        return (x - self.mean[:, None, None]) / std[:, None, None]


class PatchEmbed(nn.Module):
    """Non-overlapping patches, each flattened (row, col, channel), then Linear + position."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.proj = nn.Linear(cfg.patch_dim, cfg.dim)
        self.pos_embed = nn.Parameter(torch.zeros(cfg.num_patches, cfg.dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(patchify(x, self.patch_size)) + self.pos_embed


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C): patches row-major, each (dy, dx, channel), as Keras."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, gh, dy, gw, dx)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, gh, gw, dy, dx, C): channel fastest
    return x.reshape(B, (H // p) * (W // p), p * p * C)


class ExternalAttention(nn.Module):
    """Multi-head external attention with two memories M_k, M_v shared by all heads.

    `forward_reference` is the Keras code step by step. `forward` (the default, `fold_memories`)
    computes the same function faster: M_k follows the input projection and M_v precedes
    the output projection with nothing non-linear in between, and both are shared by every
    head, so each pair folds into one (dim x heads*S) matrix: two matmuls instead of four,
    no transposes, and (on the CPU) the dropout rescales ride on the folded output weights.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads * cfg.dim_coefficient  # 16
        self.inner = cfg.dim * cfg.dim_coefficient  # 256
        self.head_dim = self.inner // self.heads  # 16
        self.memory = cfg.memory_size or cfg.dim // cfg.dim_coefficient  # S = 16
        self.proj_in = nn.Linear(cfg.dim, self.inner)
        self.mk = nn.Linear(self.head_dim, self.memory, bias=cfg.memory_bias)
        self.mv = nn.Linear(self.memory, self.head_dim, bias=cfg.memory_bias)
        self.attn_drop = nn.Dropout(cfg.attn_drop)
        self.proj = nn.Linear(self.inner, cfg.dim)
        self.proj_drop = nn.Dropout(cfg.proj_drop)
        self.fold_memories = True  # False: the literal Keras ops (`forward_reference`)
        self._folded: tuple | None = None  # (parameters, their pointers and versions, fold)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> doubly normalised attention (B, N, heads, S), before dropout."""
        B, N, _ = x.shape
        x = self.proj_in(x).view(B, N, self.heads, self.head_dim)  # (B, N, h, d)
        attn = self.mk(x)  # (B, N, h, S): M_k is shared, so no transpose is needed
        attn = attn.softmax(dim=1)  # over the N tokens
        return attn / (1e-9 + attn.sum(dim=-1, keepdim=True))  # over the S memory slots

    def forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The Keras code's order: (B, heads, N, d) layout, softmax on axis 2."""
        B, N, _ = x.shape
        x = self.proj_in(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B,h,N,d)
        attn = self.mk(x).softmax(dim=2)  # (B, h, N, S), softmax over the N tokens
        attn = attn / (1e-9 + attn.sum(dim=-1, keepdim=True))  # over the S memory slots
        x = self.mv(self.attn_drop(attn))  # (B, h, N, d)
        x = x.transpose(1, 2).reshape(B, N, self.inner)  # (B, N, h*d)
        return self.proj_drop(self.proj(x))

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
        """`folded_weights()`, computed once while the weights stay as they are, where no
        gradient is wanted (inference); with gradients, afresh (they flow through the fold),
        and under torch.compile (whose guards on the cache would recompile the graph)."""
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.folded_weights()
        params = tuple(self.parameters())
        state = [(p.data_ptr(), p._version) for p in params]
        cached = self._folded
        if (
            cached is None
            or len(cached[0]) != len(params)
            or cached[1] != state
            or any(a is not b for a, b in zip(cached[0], params, strict=True))
        ):
            folded = tuple(w.clone() for w in self.folded_weights())
            self._folded = cached = (params, state, folded)
        return cached[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fold_memories:
            return self.forward_reference(x)
        B, N, _ = x.shape
        p1 = self.attn_drop.p if self.training else 0.0
        p2 = self.proj_drop.p if self.training else 0.0
        w_in, b_in, w_out, b_out = self.folded_weights_cached()
        z = F.linear(x, w_in, b_in).view(B, N, self.heads, self.memory)  # (B, N, h, S)
        if native_dropout(x):  # torch's dropout, which rescales by itself
            attn = self.attn_drop(double_normalize(z, token_dim=1).view(B, N, -1))
            return self.proj_drop(F.linear(attn, w_out, b_out))
        attn = masked(double_normalize(z, token_dim=1).view(B, N, -1), p1)  # (B, N, h*S)
        s1, s2 = 1.0 / (1.0 - p1), 1.0 / (1.0 - p2)  # dropout rescales, folded into w_out
        return masked(F.linear(attn, w_out * (s1 * s2), b_out * s2), p2)


class SelfAttention(nn.Module):
    """Keras `MultiHeadAttention(num_heads, key_dim=dim, dropout)`: heads of width `dim`.

    q/k/v project dim -> heads*dim, attention dropout on the weights, output projection
    heads*dim -> dim, and (as in Keras) no dropout after the output projection.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.key_dim = cfg.dim
        inner = self.heads * self.key_dim
        self.q = nn.Linear(cfg.dim, inner)
        self.k = nn.Linear(cfg.dim, inner)
        self.v = nn.Linear(cfg.dim, inner)
        self.attn_drop = cfg.attn_drop
        self.proj = nn.Linear(inner, cfg.dim)
        # Training: softmax(q k^T) written out with the cheap dropout masks, instead of
        # torch's fused attention (which draws its dropout with bernoulli_).
        self.explicit_attention = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.heads, self.key_dim).transpose(1, 2)  # (B, h, N, kd)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.training and self.explicit_attention and not native_dropout(x):
            # Training on the CPU: torch's attention draws its dropout with bernoulli_ over
            # (B, h, N, N); the explicit form uses the cheap masks, rescale folded into proj.
            w = torch.softmax((q * self.key_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
            out = masked(w, self.attn_drop) @ v  # (B, h, N, kd)
            s = 1.0 / (1.0 - self.attn_drop)
            weight, bias = self.proj.weight * s, self.proj.bias
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.attn_drop if self.training else 0.0
            )  # (B, h, N, kd), scaled by 1/sqrt(kd) as Keras
            weight, bias = self.proj.weight, self.proj.bias
        out = out.transpose(1, 2).reshape(B, N, self.heads * self.key_dim)
        return F.linear(out, weight, bias)


class Mlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.act = nn.GELU(approximate="tanh" if cfg.gelu == "tanh" else "none")
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.drop = nn.Dropout(cfg.mlp_drop)
        self.cheap_dropout = True  # `fused.masked` masks, rescale folded into fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.cheap_dropout or native_dropout(x):
            return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        p = self.drop.p if self.training else 0.0
        s = 1.0 / (1.0 - p)  # both dropout rescales folded into fc2
        act = gelu_tanh if self.act.approximate == "tanh" else self.act
        h = masked(act(self.fc1(x)), p)
        return masked(F.linear(h, self.fc2.weight * (s * s), self.fc2.bias * s), p)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero a residual branch per sample with probability p, rescale 1/(1-p).

    Identity at eval and at p = 0 (no random number drawn, so the reference is untouched).
    """
    if p == 0.0 or not training:
        return x
    keep = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), device=x.device) >= p
    return x * (keep.to(x.dtype) / (1.0 - p))


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x)).

    `drop_path`: this block's stochastic-depth rate (timm/CCT: linear in the block index
    from 0 to the config's `drop_path`).
    """

    def __init__(self, cfg: ModelConfig, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = ExternalAttention(cfg) if cfg.attention == "external" else SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg)
        self.drop_path = drop_path
        self.fast_norm = True  # `fused.layer_norm` and `fused.add_layer_norm` (CPU, bf16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, branch = self.forward_parts(x)
        return x + branch

    def forward_parts(
        self, x: torch.Tensor, pending: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(stream, branch): this block's output is stream + branch, for the input x + pending
        (the previous block's last branch, not yet added). The adds are left to the next
        LayerNorm, so that each runs in that norm's kernel pass (`fused.add_layer_norm`)."""
        p, training = self.drop_path, self.training
        x, h = self._add_norm(self.norm1, x, pending)
        x, h = self._add_norm(self.norm2, x, drop_path(self.attn(h), p, training))
        return x, drop_path(self.mlp(h), p, training)

    def _add_norm(
        self, norm: nn.LayerNorm, x: torch.Tensor, residual: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x + residual, norm(x + residual)), residual None meaning 0."""
        if not self.fast_norm:
            x = x if residual is None else x + residual
            return x, norm(x)
        if residual is None:
            return x, layer_norm(norm, x)
        return add_layer_norm(norm, x, residual)


# The switches between each layer's fast equivalent and the reference's literal ops.
FAST_PATH_SWITCHES = {
    ExternalAttention: "fold_memories",
    SelfAttention: "explicit_attention",
    Mlp: "cheap_dropout",
    Block: "fast_norm",
}


def use_reference_ops(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Run the reference's literal ops (`enabled`) or every layer's fast equivalent (not)."""
    for module in model.modules():
        switch = FAST_PATH_SWITCHES.get(type(module))
        if switch is not None:
            setattr(module, switch, not enabled)
    return model
