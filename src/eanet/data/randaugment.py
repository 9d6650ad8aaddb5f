"""RandAugment (Cubuk et al. 2020) as timm's "rand-mM-mstdS-inc1", batched on tensors.

For each of `num_ops` layers every image draws one of the 15 operations of timm's
increasing set and applies it with probability 0.5 (timm's default), at magnitude M (0..10)
plus N(0, std) noise per image, clipped to 0..10; the signed operations get a random sign.
Images are grouped by the operation they drew and each group is transformed at once: a
loop over the 15 operations, never over images. Pixels are float 0..255 (no PIL).

Magnitudes as timm's `auto_augment.py` (_LEVEL_DENOM = 10): rotate 30 degrees, shear 0.3,
translate 0.45 of the side, posterize down to 4 bits, solarize threshold 256 -> 0,
solarize-add 110, colour/contrast/brightness/sharpness factor 1 +- 0.9 at magnitude 10.
Geometric operations fill with grey 128 (timm: the data set mean), bilinear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

OPS = (
    "auto_contrast",
    "equalize",
    "invert",
    "rotate",
    "posterize",
    "solarize",
    "solarize_add",
    "color",
    "contrast",
    "brightness",
    "sharpness",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
FILL = 128.0


def _signed(m: Tensor, scale: float) -> Tensor:
    sign = torch.where(torch.rand_like(m) < 0.5, -1.0, 1.0)
    return m / 10.0 * scale * sign


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] != 3:
        return x.mean(dim=1, keepdim=True)
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b  # PIL's "L" conversion


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp(0, 255)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - FILL, grid, mode="bilinear", align_corners=False) + FILL


def _geometry(x: Tensor, op: str, m: Tensor) -> Tensor:
    """Rotate, shear or translate each image of `x` by its magnitude, grey fill."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    if op == "rotate":
        a = _signed(m, 30.0) * (math.pi / 180.0)
        theta[:, 0, 0], theta[:, 0, 1] = torch.cos(a), -torch.sin(a)
        theta[:, 1, 0], theta[:, 1, 1] = torch.sin(a), torch.cos(a)
    elif op == "shear_x":
        theta[:, 0, 1] = _signed(m, 0.3)
    elif op == "shear_y":
        theta[:, 1, 0] = _signed(m, 0.3)
    elif op == "translate_x":
        theta[:, 0, 2] = _signed(m, 0.45) * 2.0  # normalised coordinates span 2
    else:  # translate_y
        theta[:, 1, 2] = _signed(m, 0.45) * 2.0
    return _affine(x, theta)


def _equalize(x: Tensor) -> Tensor:
    """PIL's ImageOps.equalize per image and channel, via batched histograms."""
    b, c, h, w = x.shape
    v = x.round().clamp(0, 255).long().view(b * c, h * w)
    ones = torch.ones_like(v, dtype=torch.float32)
    hist = torch.zeros(b * c, 256, device=x.device).scatter_add_(1, v, ones)
    last = hist.gather(1, (v.max(dim=1, keepdim=True).values))  # count of the top value
    step = torch.floor((h * w - last) / 255.0)
    lut = torch.floor((torch.cumsum(hist, 1) - hist + torch.floor(step / 2)) / step.clamp(min=1))
    out = lut.clamp(0, 255).gather(1, v).to(x.dtype)
    return torch.where(step > 0, out, v.to(x.dtype)).view(b, c, h, w)


def _sharpness(x: Tensor, factor: Tensor) -> Tensor:
    c = x.shape[1]
    k = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13
    smooth = F.conv2d(x, k.expand(c, 1, 3, 3), groups=c)
    degenerate = x.clone()
    degenerate[..., 1:-1, 1:-1] = smooth  # PIL keeps the border pixels
    return _blend(degenerate, x, factor)


def apply_op(x: Tensor, op: str, m: Tensor) -> Tensor:
    """Operation `op` on a float pixel batch [B, C, H, W] with magnitudes m [B] in 0..10."""
    if op in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        return _geometry(x, op, m)
    if op == "auto_contrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        span = hi - lo
        return torch.where(span > 0, (x - lo) * 255.0 / span.clamp(min=1e-6), x)
    if op == "equalize":
        return _equalize(x)
    if op == "invert":
        return 255.0 - x
    if op == "posterize":
        keep = 4.0 - torch.floor(m / 10.0 * 4.0)  # bits kept: 4 at M 0, 0 at M 10 (timm)
        shift = (2.0 ** (8.0 - keep)).view(-1, 1, 1, 1)
        return torch.floor(x.round() / shift) * shift
    if op == "solarize":
        threshold = (256.0 - torch.floor(256.0 * m / 10.0)).view(-1, 1, 1, 1)
        return torch.where(x >= threshold, 255.0 - x, x)
    if op == "solarize_add":
        add = torch.floor(110.0 * m / 10.0).view(-1, 1, 1, 1)
        return torch.where(x < 128, (x + add).clamp(max=255.0), x)
    factor = 1.0 + _signed(m, 0.9)
    if op == "color":
        return _blend(_gray(x).expand_as(x), x, factor)
    if op == "contrast":
        mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
        return _blend(mean.expand_as(x), x, factor)
    if op == "brightness":
        return _blend(torch.zeros_like(x), x, factor)
    if op == "sharpness":
        return _sharpness(x, factor)
    raise ValueError(f"unknown RandAugment operation {op!r}")


def rand_augment(x: Tensor, num_ops: int, magnitude: float, magnitude_std: float = 0.0) -> Tensor:
    """RandAugment of a float pixel batch [B, C, H, W] (0..255): `num_ops` layers per image."""
    x = x.to(torch.float32).clone()
    b = x.shape[0]
    for _ in range(num_ops):
        choice = torch.randint(len(OPS), (b,), device=x.device)
        apply = torch.rand(b, device=x.device) < 0.5
        m = magnitude + magnitude_std * torch.randn(b, device=x.device)
        m = m.clamp(0.0, 10.0)
        for k, op in enumerate(OPS):
            idx = torch.nonzero(apply & (choice == k)).flatten()
            if idx.numel():
                x[idx] = apply_op(x[idx], op, m[idx])
    return x
