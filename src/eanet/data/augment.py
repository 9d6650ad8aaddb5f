"""Batched training augmentation of the Keras reference, on tensors, on any device.

The reference's ``data_augmentation`` is RandomFlip("horizontal"), RandomRotation(0.1),
RandomContrast(0.1), RandomZoom(0.2, 0.2), fill_mode "reflect", bilinear (docs/reference.md,
section 2).
Here flip, rotation and zoom become ONE affine sampling matrix per image, applied by a single
``affine_grid`` + ``grid_sample`` over the batch: one resample instead of Keras's three, so
less blur and far less work. Contrast follows that resample.

Coordinates: ``affine_grid`` normalised coordinates, x to the right (width), y DOWN (height),
(-1, -1) the outer corner of the top-left pixel (``align_corners=False``). Every matrix maps an
OUTPUT position p to the INPUT position it samples: ``out(p) = in(A @ p)``. Applying layer 1,
then 2, then 3 gives ``out(p) = in(A1 @ A2 @ A3 @ p)``, so the reference's order (flip, rotate,
zoom) composes as ``Flip @ Rot @ Zoom``.

Rotation convention (as Keras): a POSITIVE angle turns the picture COUNTER-CLOCKWISE as seen on
screen; +pi/2 on a square image equals ``torch.rot90(x, 1, dims=(-2, -1))``.

Zoom convention (as Keras): factor > 1 samples a larger area (zoom out), factor < 1 zooms in.

Fill: ``padding_mode="reflection"`` with ``align_corners=False`` reflects about the outer pixel
edge (d c b a | a b c d | d c b a), which is Keras's "reflect" fill.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from eanet.errors import ConfigError

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "affine_matrices",
    "apply_contrast",
    "apply_geometry",
    "augment",
    "augment_reference_bug",
    "sample_params",
]

PIXEL_RANGE: tuple[float, float] = (0.0, 255.0)


@dataclass(frozen=True)
class AugmentConfig:
    """The reference's training augmentation."""

    flip: bool = True
    rotation: float = 0.1  # fraction of a full turn: angle uniform in +-rotation * 2 pi
    contrast: float = 0.1  # factor uniform in [1 - contrast, 1 + contrast]
    zoom_height: float = 0.2  # height zoom uniform in [1 - zoom_height, 1 + zoom_height]
    zoom_width: float = 0.2  # width zoom, drawn independently of the height zoom

    def __post_init__(self) -> None:
        if not isinstance(self.flip, bool):
            raise ConfigError(f"augment flip must be true or false, got {self.flip!r}")
        # (name, value, upper bound, whether the bound itself is allowed)
        limits = (
            ("rotation", self.rotation, 0.5, True),
            ("contrast", self.contrast, 1.0, False),
            ("zoom_height", self.zoom_height, 1.0, False),
            ("zoom_width", self.zoom_width, 1.0, False),
        )
        for name, value, upper, inclusive in limits:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"augment {name} must be a number, got {value!r}")
            # `not (value >= 0)` also rejects NaN
            within = value <= upper if inclusive else value < upper
            if not (value >= 0) or not within:
                bound = f"<= {upper}" if inclusive else f"< {upper}"
                raise ConfigError(f"augment {name} must be >= 0 and {bound}, got {value!r}")


@dataclass
class AugmentParams:
    """Per-image random draws of one batch (all tensors [B] on the batch's device)."""

    flip: Tensor  # bool: mirror left-right
    angle: Tensor  # radians, positive = counter-clockwise on screen
    zoom_h: Tensor  # > 1 zooms out
    zoom_w: Tensor
    contrast: Tensor  # contrast factor


def sample_params(
    batch: int,
    cfg: AugmentConfig,
    device: torch.device | str,
    generator: torch.Generator | None = None,
) -> AugmentParams:
    """Draw one batch of augmentation parameters (global RNG of `device` when generator=None)."""
    # One draw for all five parameters, whatever the config: the RNG stream consumed per batch
    # is then fixed, and a disabled augmentation does not shift the others' random numbers.
    u = torch.rand((5, batch), generator=generator, device=device, dtype=torch.float32)
    sym = 2.0 * u - 1.0  # uniform in [-1, 1)
    flip = u[0] < 0.5
    if not cfg.flip:
        flip = torch.zeros_like(flip)
    return AugmentParams(
        flip=flip,
        angle=sym[1] * (cfg.rotation * 2.0 * math.pi),
        zoom_h=1.0 + sym[2] * cfg.zoom_height,
        zoom_w=1.0 + sym[3] * cfg.zoom_width,
        contrast=1.0 + sym[4] * cfg.contrast,
    )


def affine_matrices(params: AugmentParams, height: int, width: int) -> Tensor:
    """Compose flip, rotation and zoom into float32 `affine_grid` thetas [B, 2, 3]."""
    fx = 1.0 - 2.0 * params.flip.to(torch.float32)  # -1 mirrors x
    cos = torch.cos(params.angle.to(torch.float32))
    sin = torch.sin(params.angle.to(torch.float32))
    zw = params.zoom_w.to(torch.float32)
    zh = params.zoom_h.to(torch.float32)
    # Rotate in pixel units, S^-1 @ R @ S with S = diag(W/2, H/2), so a non-square image turns
    # rigidly instead of shearing. R samples in[(c x - s y, s x + c y)] (y down), which shows
    # the picture turned counter-clockwise for s > 0.
    h_over_w = height / width
    w_over_h = width / height
    zero = torch.zeros_like(cos)
    # Flip @ Rot @ Zoom, multiplied out.
    row_x = torch.stack([fx * cos * zw, -fx * sin * h_over_w * zh, zero], dim=-1)
    row_y = torch.stack([sin * w_over_h * zw, cos * zh, zero], dim=-1)
    return torch.stack([row_x, row_y], dim=-2)  # (B, 2, 3)


def _check_batch(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(
            f"augmentation expects an image batch [B, C, H, W], got shape {tuple(x.shape)}"
        )


def apply_geometry(x: Tensor, theta: Tensor) -> Tensor:
    """Resample a float batch [B, C, H, W] once through thetas [B, 2, 3], bilinear, reflect fill."""
    _check_batch(x)
    if x.shape[0] == 0:  # affine_grid refuses an empty batch; a static shape check, compile-safe
        return x.clone()
    theta = theta.to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def apply_contrast(
    x: Tensor, factor: Tensor, clip: tuple[float, float] | None = PIXEL_RANGE
) -> Tensor:
    """Scale each image's deviation from its per-channel mean by factor [B], then clip."""
    _check_batch(x)
    mean = x.mean(dim=(-2, -1), keepdim=True)  # (B, C, 1, 1)
    out = (x - mean) * factor.to(device=x.device, dtype=x.dtype).view(-1, 1, 1, 1) + mean
    if clip is not None:
        out = out.clamp(clip[0], clip[1])
    return out


def _augment_float(x: Tensor, cfg: AugmentConfig, generator: torch.Generator | None) -> Tensor:
    params = sample_params(x.shape[0], cfg, x.device, generator)
    theta = affine_matrices(params, x.shape[-2], x.shape[-1])
    # Keras clips to its value_range (0, 255) whatever the input's scale; so do we.
    return apply_contrast(apply_geometry(x, theta), params.contrast, PIXEL_RANGE)


def augment(
    x: Tensor, cfg: AugmentConfig = AugmentConfig(), generator: torch.Generator | None = None
) -> Tensor:
    """Augment a pixel-space batch [B, C, H, W] (0..255, uint8 or float); float32 in [0, 255].

    Fixed order: x is a float batch [B, C, H, W] in PIXEL space 0..255; returns the augmented
    batch, still in pixel space, values within [0, 255]. Normalization happens afterwards,
    inside the model.

    Difference from Keras: Keras runs three separate layers (flip, rotation resample, contrast,
    zoom resample) and so takes the contrast's per-channel mean after the rotation but before
    the zoom. Here flip, rotation and zoom are one resample and contrast comes after it, so the
    mean is taken after the zoom: statistically equivalent (a zoomed, reflect-filled image has
    on average the same channel means), with one interpolation instead of two.
    """
    _check_batch(x)
    return _augment_float(x.to(torch.float32), cfg, generator)


def augment_reference_bug(
    x_normalized: Tensor,
    cfg: AugmentConfig = AugmentConfig(),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Reproduce the reference's broken order: contrast clips normalized inputs to [0, 255].

    The reference's order, kept only to reproduce its failure: x is ALREADY normalized; same
    geometry; contrast clips to (0, 255), which wipes out every negative normalized value in
    training (docs/reference.md, section 3). Never the default.
    """
    _check_batch(x_normalized)
    return _augment_float(x_normalized.to(torch.float32), cfg, generator)
