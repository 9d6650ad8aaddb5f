"""Random erasing (Zhong et al. 2017; timm's RandomErasing), batched on tensors.

Each image, with probability `prob`, gets one rectangle of area fraction uniform in
[0.02, 1/3] and aspect ratio log-uniform in [0.3, 3.3] filled with random pixels, as timm's
"pixel" mode. Difference from timm: timm erases after normalisation with N(0, 1) noise and
retries a draw that does not fit up to 10 times; here the images are still in pixel space,
so the noise is uniform over 0..255, and a rectangle that does not fit is clamped to the
image (one draw per image, no loop).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

ERASE_AREA = (0.02, 1 / 3)
ERASE_RATIO = (0.3, 3.3)


def erase_masks(
    batch: int, height: int, width: int, prob: float, device: torch.device | str
) -> Tensor:
    """Bool masks [B, 1, H, W]: True inside the rectangle of each image drawn to be erased."""
    u = torch.rand((5, batch), device=device, dtype=torch.float32)
    area = ERASE_AREA[0] + (ERASE_AREA[1] - ERASE_AREA[0]) * u[0]
    log_r = math.log(ERASE_RATIO[0]) + (math.log(ERASE_RATIO[1]) - math.log(ERASE_RATIO[0])) * u[1]
    r = torch.exp(log_r)
    h = torch.round(torch.sqrt(area * r) * height).clamp(1, height)
    w = torch.round(torch.sqrt(area / r) * width).clamp(1, width)
    top = torch.floor(u[2] * (height - h + 1))
    left = torch.floor(u[3] * (width - w + 1))
    rows = torch.arange(height, device=device, dtype=torch.float32).view(1, -1, 1)
    cols = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, -1)
    inside_r = (rows >= top.view(-1, 1, 1)) & (rows < (top + h).view(-1, 1, 1))
    inside_c = (cols >= left.view(-1, 1, 1)) & (cols < (left + w).view(-1, 1, 1))
    chosen = (u[4] < prob).view(-1, 1, 1)
    return (inside_r & inside_c & chosen).unsqueeze(1)


def random_erase(x: Tensor, prob: float) -> Tensor:
    """A float pixel batch [B, C, H, W] with a random rectangle of noise in some images."""
    b, c, h, w = x.shape
    mask = erase_masks(b, h, w, prob, x.device)
    noise = torch.rand_like(x) * 255.0
    return torch.where(mask, noise, x)
