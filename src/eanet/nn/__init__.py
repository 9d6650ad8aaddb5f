"""External attention as a building block for your own models.

- `ExternalAttention(dim, heads=16, coefficient=4, memory=None, bias=True, attn_drop=0.2,
  proj_drop=0.2)`: tokens (B, N, dim) -> (B, N, dim); the defaults are the Keras example's
  layer, the one eanet's EANet is built of.
- `ExternalAttention2d(channels, memory=64)`: feature maps (B, C, H, W) -> (B, C, H, W), the
  paper's official code's residual block.
- `swap_attention(model, ...)`: every self-attention module of an existing model
  (`nn.MultiheadAttention`, eanet's `SelfAttention`) replaced by external attention of the
  same width; returns what it replaced (`SwapReport`).

docs/external-attention.md sets these beside the official code and External-Attention-pytorch.
"""

from eanet.models.layers import ExternalAttention
from eanet.nn.external2d import ExternalAttention2d
from eanet.nn.swap import MultiheadExternalAttention, Replaced, SwapReport, swap_attention

__all__ = [
    "ExternalAttention",
    "ExternalAttention2d",
    "MultiheadExternalAttention",
    "Replaced",
    "SwapReport",
    "swap_attention",
]
