"""Random resized crop + horizontal flip, batched on tensors: one affine resample per batch.

The crop of the small-transformer recipes (timm's RandomResizedCropAndInterpolation, as the
CCT CIFAR configs set it: scale (0.8, 1.0), ratio (3/4, 4/3), flip with probability 0.5).
Conventions are `eanet.data.augment`'s: thetas map an OUTPUT position to the INPUT position
it samples, in `affine_grid`'s normalised coordinates (-1..1). A crop of relative width w
centred at cx samples in(x) at x' = cx + w * x; a flip negates the x scale.

Difference from timm: timm retries up to 10 draws when a crop does not fit and then falls
back to a centre crop; here the sides are clamped to the image instead (one draw, no loop).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

CROP_SCALE = (0.8, 1.0)  # fraction of the image area kept
CROP_RATIO = (3 / 4, 4 / 3)  # width / height of the crop


def crop_flip_thetas(
    batch: int,
    device: torch.device | str,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
    flip: bool = True,
) -> Tensor:
    """One draw of `affine_grid` thetas [B, 2, 3] for a random resized crop (+ flip)."""
    u = torch.rand((5, batch), device=device, dtype=torch.float32)
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[1]
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)  # relative side lengths
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (1.0 - w) * (2.0 * u[2] - 1.0)  # the crop stays inside the image
    cy = (1.0 - h) * (2.0 * u[3] - 1.0)
    fx = torch.where(u[4] < 0.5, -1.0, 1.0) if flip else torch.ones_like(w)
    zero = torch.zeros_like(w)
    row_x = torch.stack([fx * w, zero, cx], dim=-1)
    row_y = torch.stack([zero, h, cy], dim=-1)
    return torch.stack([row_x, row_y], dim=-2)


def random_resized_crop_flip(x: Tensor) -> Tensor:
    """A float pixel batch [B, C, H, W] cropped, resized back (bilinear) and maybe mirrored."""
    x = x.to(torch.float32)
    if x.shape[0] == 0:
        return x.clone()
    theta = crop_flip_thetas(x.shape[0], x.device)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
