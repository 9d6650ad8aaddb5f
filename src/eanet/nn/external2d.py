"""External attention on feature maps (B, C, H, W), in the form of the paper's official code."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from eanet.errors import ConfigError


class ExternalAttention2d(nn.Module):
    """External attention on feature maps (B, C, H, W) -> (B, C, H, W), a residual block.

    Axes: B images, C = `channels`, N = H*W pixels, S = `memory` memory units (the official
    code's 64). Step by step: a 1x1 convolution C -> C; M_k (Conv1d C -> S, no bias) gives
    each pixel's affinity to each unit, (B, S, N); softmax over the N pixels; division by
    the sum over the S units (the L1 normalisation, with 1e-9 added); M_v (Conv1d S -> C,
    no bias); a 1x1 convolution C -> C (no bias) and BatchNorm; the input added back; ReLU.

    Initialised as the official code leaves it: convolution weights N(0, 2 / fan_out),
    M_v's weight N(0, 2 / C) and M_k's its transpose. (The official code makes M_v's
    weight a transposed view of M_k's, one storage for both, so the two stay tied under an
    optimiser that updates in place; here they start equal and train apart, two memories.)

    Scriptable (`torch.jit.script`): the forward uses TorchScript's subset of Python only.
    """

    def __init__(self, channels: int, memory: int = 64) -> None:
        super().__init__()
        for name, value in (("channels", channels), ("memory", memory)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"ExternalAttention2d {name}={value!r} must be a positive integer"
                )
        self.channels = channels
        self.memory = memory  # S
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.mk = nn.Conv1d(channels, memory, 1, bias=False)
        self.mv = nn.Conv1d(memory, channels, 1, bias=False)
        self.proj = nn.Conv2d(channels, channels, 1, bias=False)
        self.norm = nn.BatchNorm2d(channels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The official code's initialisation (see the class docstring)."""
        for conv in (self.proj_in, self.proj):
            nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / conv.out_channels))
        nn.init.normal_(self.mv.weight, 0.0, math.sqrt(2.0 / self.channels))
        self.mk.weight.copy_(self.mv.weight.permute(1, 0, 2))  # (S, C, 1) = M_v^T
        self.norm.reset_parameters()

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> each unit's doubly normalised attention over the pixels (B, S, H, W)."""
        self._check(x)
        B, H, W = x.shape[0], x.shape[2], x.shape[3]
        attn = self.mk(self.proj_in(x).flatten(2))  # (B, S, N)
        attn = attn.softmax(dim=-1)  # softmax over the N pixels
        attn = attn / (1e-9 + attn.sum(dim=1, keepdim=True))  # L1 over the S memory units
        return attn.view(B, self.memory, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attention_map(x).flatten(2)  # (B, S, N)
        out = self.mv(attn).view(x.shape)  # (B, C, N) -> (B, C, H, W)
        return F.relu(x + self.norm(self.proj(out)))

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.channels:
            c = self.channels
            shape = ", ".join([str(d) for d in x.shape])  # tuple(x.shape) is not TorchScript
            raise ValueError(
                f"ExternalAttention2d(channels={c}) takes feature maps (B, {c}, H, W), got "
                f"shape ({shape}); build it with the channels of the maps it gets"
            )
