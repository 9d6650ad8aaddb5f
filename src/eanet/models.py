"""EANet and its ViT baseline, built exactly as the Keras example builds them.

One encoder, two attention modules: `ExternalAttention` (EANet) or `SelfAttention` (ViT).
The model takes raw pixels (0..255, NCHW); the normalization statistics of the training
set live in the model as buffers, so a saved model needs no separate preprocessing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from eanet.errors import ConfigError
from eanet.fused import double_normalize, masked
from eanet.typecheck import check_field_types

ATTENTIONS = ("external", "self")
INITS = ("keras", "trunc_normal")


@dataclass
class ModelConfig:
    """Every number that defines an EANet or ViT; the defaults are the Keras example's EANet."""

    attention: str = "external"  # "external" (EANet) or "self" (ViT)
    image_size: int = 32
    patch_size: int = 2
    in_chans: int = 3
    dim: int = 64  # embedding_dim
    depth: int = 8  # num_transformer_blocks
    num_heads: int = 4
    dim_coefficient: int = 4  # external attention: heads *= 4, inner width = dim * 4
    mlp_dim: int = 64
    memory_size: int | None = None  # external attention S; None = dim // dim_coefficient (16)
    memory_bias: bool = True
    attn_drop: float = 0.2
    proj_drop: float = 0.2
    mlp_drop: float = 0.2
    num_classes: int = 100
    gelu: str = "tanh"  # Keras `ops.gelu` defaults to the tanh approximation
    ln_eps: float = 1e-5
    init: str = "keras"  # "keras" (Glorot-uniform, Keras fans) or "trunc_normal" (paper code)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible field."""
        check_field_types(self, lambda name, value: f"model option {name}={value!r}")
        _choice("attention", self.attention, ATTENTIONS)
        _choice("init", self.init, INITS)
        _choice("gelu", self.gelu, ("tanh", "erf"))
        for name in (
            "image_size",
            "patch_size",
            "in_chans",
            "dim",
            "depth",
            "num_heads",
            "dim_coefficient",
            "mlp_dim",
            "num_classes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model option {name}={value!r} must be a positive integer")
        if self.memory_size is not None and (
            not isinstance(self.memory_size, int) or self.memory_size < 1
        ):
            raise ConfigError(f"model option memory_size={self.memory_size!r} must be >= 1")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"patch_size={self.patch_size} does not divide image_size={self.image_size}; "
                "choose a patch size that divides the image size"
            )
        if self.dim % self.num_heads:
            raise ConfigError(
                f"dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                "choose dim as a multiple of num_heads"
            )
        for name in ("attn_drop", "proj_drop", "mlp_drop"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model option {name}={value!r} must be in [0, 1)")
        if not self.ln_eps > 0:
            raise ConfigError(f"model option ln_eps={self.ln_eps!r} must be > 0")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from a saved dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown model option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"model option {name}={value!r} must be one of {', '.join(choices)}")


# --------------------------------------------------------------------------- layers


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

    `forward_reference` is the Keras code step by step. `forward` (the default, `fast`)
    computes the same function faster: M_k follows the input projection and M_v precedes
    the output projection with nothing non-linear in between, and both are shared by every
    head, so each pair folds into one (dim x heads*S) matrix: two matmuls instead of four,
    no transposes, and the dropout rescales ride on the folded output weights.
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
        self.fast = True

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return self.forward_reference(x)
        B, N, _ = x.shape
        p1 = self.attn_drop.p if self.training else 0.0
        p2 = self.proj_drop.p if self.training else 0.0
        w_in, b_in, w_out, b_out = self.folded_weights()
        z = F.linear(x, w_in, b_in).view(B, N, self.heads, self.memory)  # (B, N, h, S)
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
        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(B, N, self.heads, self.key_dim).transpose(1, 2)  # (B, h, N, kd)

        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        if self.training and self.fast:
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

        self.fast = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))
        p = self.drop.p if self.training else 0.0
        s = 1.0 / (1.0 - p)  # both dropout rescales folded into fc2
        h = masked(self.act(self.fc1(x)), p)
        return masked(F.linear(h, self.fc2.weight * (s * s), self.fc2.bias * s), p)


class Block(nn.Module):
    """Pre-norm transformer block: x + Attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.attn = ExternalAttention(cfg) if cfg.attention == "external" else SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.ln_eps)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


# --------------------------------------------------------------------------- model


class VisionTransformer(nn.Module):
    """Normalization -> patches -> embedding -> blocks -> mean over tokens -> logits."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or ModelConfig()
        self.normalize = Normalize(cfg.in_chans)
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        init_weights(self, cfg.init)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_chans, c.image_size, c.image_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> tokens (B, N, dim)."""
        x = self.patch_embed(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N, dim) -> logits (B, num_classes)."""
        return self.head(x.mean(dim=1))

    def forward(self, x: torch.Tensor, *, normalized: bool = False) -> torch.Tensor:
        """Raw pixels 0..255, float or uint8, (B, C, H, W) -> logits (B, num_classes).

        `normalized=True` skips the built-in normalization (the reference-bug training order
        normalises before augmenting).
        """
        if x.dim() != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(
                f"expected images of shape (B, {', '.join(map(str, self.input_shape))}), "
                f"got {tuple(x.shape)}"
            )
        x = x.float()
        if not normalized:
            x = self.normalize(x)
        return self.forward_head(self.forward_features(x))


class EANet(VisionTransformer):
    """The External Attention Transformer of the Keras example."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__(dataclasses.replace(cfg or ModelConfig(), attention="external"))


class ViT(VisionTransformer):
    """The self-attention baseline: the same network with Keras MultiHeadAttention."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__(dataclasses.replace(cfg or ModelConfig(), attention="self"))


# --------------------------------------------------------------------------- init


def _glorot_(weight: torch.Tensor, fan_in: int, fan_out: int) -> None:
    limit = math.sqrt(6.0 / (fan_in + fan_out))
    nn.init.uniform_(weight, -limit, limit)


@torch.no_grad()
def init_weights(model: VisionTransformer, scheme: str = "keras") -> None:
    """Keras: Glorot-uniform kernels with Keras's fans, zero biases, Embedding U(-0.05, 0.05).

    Keras computes Glorot fans from the kernel's own shape. MultiHeadAttention stores q/k/v
    as (dim, heads, key_dim) and the output as (heads, key_dim, dim), so their fans are
    (heads*dim, key_dim*dim) and (key_dim*heads, dim*heads), not those of a plain Linear.
    """
    for module in model.modules():
        if isinstance(module, nn.Linear):
            if scheme == "keras":
                _glorot_(module.weight, module.in_features, module.out_features)
            else:
                nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    if scheme == "keras":
        nn.init.uniform_(model.patch_embed.pos_embed, -0.05, 0.05)
        for module in model.modules():
            if isinstance(module, SelfAttention):
                h, kd, d = module.heads, module.key_dim, model.config.dim
                for lin in (module.q, module.k, module.v):
                    _glorot_(lin.weight, h * d, kd * d)
                _glorot_(module.proj.weight, kd * h, d * h)
    else:
        nn.init.trunc_normal_(model.patch_embed.pos_embed, std=0.02)


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class ModelSpec:
    """A named variant: its config and a one-line description."""

    config: ModelConfig
    description: str


MODELS: dict[str, ModelSpec] = {
    "eanet-cifar": ModelSpec(
        ModelConfig(), "EANet of the Keras example (external attention, S=16), 361,380 params"
    ),
    "vit-cifar": ModelSpec(
        ModelConfig(attention="self"),
        "ViT baseline of the Keras example (4 heads of width 64), 623,268 params",
    ),
    "eanet-cifar-s64": ModelSpec(
        ModelConfig(memory_size=64, memory_bias=False, init="trunc_normal"),
        "paper-style EANet: memory size S=64, bias-free memories, truncated-normal init",
    ),
}


def model_config(name: str, **overrides: object) -> ModelConfig:
    """The config of a registered variant with `overrides` applied (validated)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    base = MODELS[name].config.to_dict()
    unknown = sorted(set(overrides) - set(base))
    if unknown:
        raise ConfigError(
            f"unknown model option(s) {', '.join(unknown)}; known: {', '.join(sorted(base))}"
        )
    return ModelConfig(**{**base, **overrides})


def build_model(cfg: ModelConfig) -> VisionTransformer:
    """A freshly initialised model for `cfg`."""
    return EANet(cfg) if cfg.attention == "external" else ViT(cfg)


def create_model(name: str = "eanet-cifar", **overrides: object) -> VisionTransformer:
    """A registered variant by name, e.g. `create_model("vit-cifar", num_classes=10)`."""
    return build_model(model_config(name, **overrides))


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; the 7 normalization statistics are buffers."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def set_fast_path(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch between the fast equivalent ops (default) and the reference's literal ops."""
    for module in model.modules():
        if hasattr(module, "fast"):
            module.fast = enabled
    return model
