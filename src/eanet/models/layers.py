"""The layers of the encoder, each as the Keras example builds it, in plain torch ops.

Normalization (pixel space, Keras `Normalization`), patch embedding, external attention
(EANet), multi-head self-attention (ViT), the MLP and the pre-norm block. Faster
equivalents of these layers live in `eanet.accel`, which swaps them in from outside.
"""

from __future__ import annotations

import torch
from torch import nn

from eanet.errors import ConfigError
from eanet.models.config import ModelConfig


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
    """Multi-head external attention on tokens (B, N, dim): two memories M_k, M_v shared by
    all heads; `ExternalAttention(64)` is the Keras example's layer.

    Axes: B images, N tokens, `heads` heads of width d = dim * coefficient / heads, S =
    `memory` memory units (default dim // coefficient). Step by step: Linear dim ->
    dim*coefficient, split into heads; M_k (Linear d -> S) gives each token's affinity to
    the S units; softmax over the N tokens; division by the sum over the S units (the L1
    normalisation, with 1e-9 added, of the paper's double normalisation); dropout; M_v
    (Linear S -> d); merge the heads; Linear back to dim; dropout. The Keras example's
    `num_heads=4, dim_coefficient=4` is heads=16 here. Parameters start as torch's Linear
    defaults (the registered models re-initialise them the Keras way).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 16,
        coefficient: int = 4,
        memory: int | None = None,
        bias: bool = True,
        attn_drop: float = 0.2,
        proj_drop: float = 0.2,
    ) -> None:
        super().__init__()
        memory = dim // coefficient if memory is None else memory
        _check_external(dim, heads, coefficient, memory)
        self.heads = heads
        self.inner = dim * coefficient
        self.head_dim = self.inner // heads  # d
        self.memory = memory  # S
        self.proj_in = nn.Linear(dim, self.inner)
        self.mk = nn.Linear(self.head_dim, memory, bias=bias)
        self.mv = nn.Linear(memory, self.head_dim, bias=bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(self.inner, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> doubly normalised attention (B, heads, N, S), before dropout."""
        B, N, _ = x.shape
        x = self.proj_in(x).view(B, N, self.heads, self.head_dim).transpose(1, 2)  # (B,h,N,d)
        attn = self.mk(x).softmax(dim=2)  # (B, h, N, S), softmax over the N tokens
        return attn / (1e-9 + attn.sum(dim=-1, keepdim=True))  # over the S memory units

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> (B, N, dim)."""
        B, N, _ = x.shape
        x = self.mv(self.attn_drop(self.attention_map(x)))  # (B, h, N, d)
        x = x.transpose(1, 2).reshape(B, N, self.inner)  # (B, N, h*d)
        return self.proj_drop(self.proj(x))


def _check_external(dim: int, heads: int, coefficient: int, memory: int) -> None:
    """Raise ConfigError naming the first impossible size of an ExternalAttention."""
    sizes = {"dim": dim, "heads": heads, "coefficient": coefficient, "memory": memory}
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(
                f"ExternalAttention {name}={value!r} must be a positive integer"
                + (" (the default memory is dim // coefficient)" if name == "memory" else "")
            )
    if dim * coefficient % heads:
        raise ConfigError(
            f"ExternalAttention heads={heads} does not divide dim*coefficient={dim * coefficient}; "
            "choose heads that divide it"
        )


def external_attention(cfg: ModelConfig) -> ExternalAttention:
    """The external attention of a model config: the Keras example's num_heads *
    dim_coefficient heads, memory_size units (default dim // dim_coefficient)."""
    return ExternalAttention(
        cfg.dim,
        heads=cfg.num_heads * cfg.dim_coefficient,
        coefficient=cfg.dim_coefficient,
        memory=cfg.memory_size,
        bias=cfg.memory_bias,
        attn_drop=cfg.attn_drop,
        proj_drop=cfg.proj_drop,
    )


class SelfAttention(nn.Module):
    """Keras `MultiHeadAttention(num_heads, key_dim=dim, dropout)`: heads of width `dim`.

    q/k/v project dim -> heads*dim, softmax(q k^T / sqrt(key_dim)), attention dropout on the
    weights, output projection heads*dim -> dim, and (as in Keras) no dropout after it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads = cfg.num_heads
        self.key_dim = cfg.dim
        inner = self.heads * self.key_dim
        self.q = nn.Linear(cfg.dim, inner)
        self.k = nn.Linear(cfg.dim, inner)
        self.v = nn.Linear(cfg.dim, inner)
        self.attn_drop = nn.Dropout(cfg.attn_drop)
        self.proj = nn.Linear(inner, cfg.dim)

    def split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(B, N, heads*key_dim) -> (B, heads, N, key_dim)."""
        B, N, _ = t.shape
        return t.view(B, N, self.heads, self.key_dim).transpose(1, 2)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, dim) -> attention weights (B, heads, N queries, N keys), before dropout."""
        q, k = self.split_heads(self.q(x)), self.split_heads(self.k(x))
        attn = (q * self.key_dim**-0.5) @ k.transpose(-2, -1)  # (B, h, N, N)
        return attn.softmax(dim=-1)  # softmax over the keys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        attn = self.attn_drop(self.attention_map(x))  # (B, h, N, N)
        out = (attn @ self.split_heads(self.v(x))).transpose(1, 2)  # (B, N, h, key_dim)
        return self.proj(out.reshape(B, N, self.heads * self.key_dim))


class Mlp(nn.Module):
    """Linear -> GELU -> Dropout -> Linear -> Dropout."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_dim)
        self.act = nn.GELU(approximate="tanh" if cfg.gelu == "tanh" else "none")
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.dim)
        self.drop = nn.Dropout(cfg.mlp_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


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
        self.attn = external_attention(cfg) if cfg.attention == "external" else SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg)
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + drop_path(self.attn(self.norm1(x)), self.drop_path, self.training)
        x = x + drop_path(self.mlp(self.norm2(x)), self.drop_path, self.training)
        return x
