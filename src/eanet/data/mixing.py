"""Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), batched, without a host sync.

As timm's `Mixup` in its default "batch" mode: one mixing factor lam ~ Beta(alpha, alpha)
per batch, the partner of image i is image B-1-i (the batch reversed), with probability
`switch_prob` CutMix instead of mixup when both are on, and with probability `prob` at all.
CutMix pastes the partner's box of area (1 - lam) (its centre uniform, clipped at the
borders) and corrects lam to the area actually pasted. Everything stays a tensor on the
batch's device: both variants are computed and one is selected with `torch.where`, so no
Python branch waits for a random number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from eanet.compat import standard_gamma


@dataclass(frozen=True)
class MixConfig:
    """Mixup/CutMix settings; an alpha of 0 turns that variant off."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0
    switch_prob: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


def _beta(alpha: float, device: torch.device) -> Tensor:
    a = torch.tensor([alpha, alpha], device=device, dtype=torch.float32)
    g = standard_gamma(a)  # Beta(a, a) = G1 / (G1 + G2) with G1, G2 ~ Gamma(a)
    return g[:1] / g.sum()


def _box_mask(h: int, w: int, lam: Tensor, device: torch.device) -> Tensor:
    """Bool mask [1, 1, H, W] of a box of area about (1 - lam) * H * W, centre uniform."""
    cut = torch.sqrt(1.0 - lam)
    ch, cw = torch.floor(h * cut), torch.floor(w * cut)
    u = torch.rand(2, device=device)
    cy, cx = torch.floor(u[0] * h), torch.floor(u[1] * w)
    y0, y1 = (cy - ch / 2).clamp(0, h).floor(), (cy + ch / 2).clamp(0, h).floor()
    x0, x1 = (cx - cw / 2).clamp(0, w).floor(), (cx + cw / 2).clamp(0, w).floor()
    rows = torch.arange(h, device=device, dtype=torch.float32).view(-1, 1)
    cols = torch.arange(w, device=device, dtype=torch.float32).view(1, -1)
    return ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).view(1, 1, h, w)


def mix_batch(x: Tensor, cfg: MixConfig) -> tuple[Tensor, Tensor]:
    """(mixed batch, lam): image i becomes lam * x[i] + (1 - lam) * x[B-1-i] (or a box of it)."""
    device = x.device
    _, _, h, w = x.shape
    partner = x.flip(0)
    one = torch.ones(1, device=device)
    lam_mix = _beta(cfg.mixup_alpha, device) if cfg.mixup_alpha > 0 else one
    lam_cut = _beta(cfg.cutmix_alpha, device) if cfg.cutmix_alpha > 0 else one
    u = torch.rand(2, device=device)
    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cut = u[0] < cfg.switch_prob
    else:
        use_cut = torch.tensor(cfg.cutmix_alpha > 0, device=device)
    box = _box_mask(h, w, lam_cut, device)
    lam_cut = 1.0 - box.sum() / (h * w)  # the area actually pasted
    blended = lam_mix * x + (1 - lam_mix) * partner
    mixed = torch.where(use_cut, torch.where(box, partner, x), blended)
    lam = torch.where(use_cut, lam_cut, lam_mix).reshape(())
    apply = u[1] < cfg.prob
    return torch.where(apply, mixed, x), torch.where(apply, lam, torch.ones_like(lam))


def mixed_targets(y: Tensor, lam: Tensor, num_classes: int) -> Tensor:
    """Soft targets [B, classes] of a batch mixed by `mix_batch`: rows sum to 1."""
    one_hot = F.one_hot(y, num_classes).to(torch.float32)
    return lam * one_hot + (1.0 - lam) * one_hot.flip(0)
