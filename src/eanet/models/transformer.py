"""One encoder, two attention modules: EANet (external attention) or ViT (self-attention).

The model takes raw pixels (0..255, NCHW); the normalization statistics of the training
set live in the model as buffers, so a saved model needs no separate preprocessing.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from eanet.models.config import ModelConfig
from eanet.models.layers import Block, Normalize, PatchEmbed, SelfAttention


class VisionTransformer(nn.Module):
    """Normalization -> patches -> embedding -> blocks -> mean over tokens -> logits."""

    def __init__(self, cfg: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = cfg or ModelConfig()
        self.normalize = Normalize(cfg.in_chans)
        self.patch_embed = PatchEmbed(cfg)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.Sequential(*(Block(cfg, rate) for rate in rates))
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        init_weights(self, cfg.init)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c = self.config
        return (c.in_chans, c.image_size, c.image_size)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> tokens (B, N, dim)."""
        return self.blocks(self.patch_embed(x))  # (B, N, dim)

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
