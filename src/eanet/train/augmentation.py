"""Which augmentation a training batch gets: decided once from the config, in one place.

`BatchAugment.from_config(cfg)` reads every augmentation option of a TrainConfig (the
order of `--augment`, RandAugment, random erasing, mixup/CutMix); calling the result on a
uint8 batch runs them, always in the same order: the order's own transform (the
reference's flip/rotate/contrast/zoom, or crop-flip, or nothing), RandAugment, erasing,
then mixing, then the model. `--augment reference-bug` is the exception the reference
made: it normalises first and augments the normalised batch (no extras with it;
TrainConfig refuses the mix). A disabled step draws no random numbers, so each
combination consumes the RNG exactly as the step functions it calls.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from eanet.data.augment import AugmentConfig, augment, augment_reference_bug
from eanet.data.crop import random_resized_crop_flip
from eanet.data.erasing import random_erase
from eanet.data.mixing import MixConfig, mix_batch, mixed_targets
from eanet.data.randaugment import rand_augment
from eanet.train.config import TrainConfig

REFERENCE_GEOMETRY = AugmentConfig()  # flip, rotation 0.1, contrast 0.1, zoom 0.2 x 0.2


@dataclass(frozen=True)
class RandAugmentSettings:
    """RandAugment's operations per image, magnitude (0..10) and per-image magnitude noise."""

    ops: int
    magnitude: float
    magnitude_std: float = 0.0


@dataclass(frozen=True)
class BatchAugment:
    """The augmentation of every training batch of a run: `__call__` gives (logits, targets)."""

    order: str = "fixed"  # TrainConfig.augment: fixed, reference-bug, none or crop-flip
    geometry: AugmentConfig = REFERENCE_GEOMETRY  # for fixed and reference-bug
    randaugment: RandAugmentSettings | None = None
    erase_prob: float = 0.0  # random erasing's probability per image (0: off)
    mix: MixConfig | None = None  # mixup/CutMix (None: off, targets stay class indices)

    @classmethod
    def from_config(
        cls, cfg: TrainConfig, geometry: AugmentConfig = REFERENCE_GEOMETRY
    ) -> BatchAugment:
        """The augmentation `cfg` asks for: the one place its options are read."""
        ra = None
        if cfg.randaugment_ops:
            ra = RandAugmentSettings(
                cfg.randaugment_ops, cfg.randaugment_magnitude, cfg.randaugment_magnitude_std
            )
        mix = MixConfig(cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_prob, cfg.mix_switch_prob)
        return cls(cfg.augment, geometry, ra, cfg.erase_prob, mix if mix.enabled else None)

    @property
    def in_pixel_space(self) -> bool:
        """Whether the batch is augmented before normalisation (all but reference-bug)."""
        return self.order != "reference-bug"

    def pixels(self, x: Tensor) -> Tensor:
        """A uint8 batch [B, C, H, W] augmented in pixel space, float32 0..255, not mixed."""
        if not self.in_pixel_space:
            raise ValueError("--augment reference-bug augments normalised images, not pixels")
        x = x.float()
        if self.order == "fixed":
            x = augment(x, self.geometry)
        elif self.order == "crop-flip":
            x = random_resized_crop_flip(x)
        if self.randaugment is not None:
            ra = self.randaugment
            x = rand_augment(x, ra.ops, ra.magnitude, ra.magnitude_std)
        if self.erase_prob:
            x = random_erase(x, self.erase_prob)
        return x

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(logits, targets) of a uint8 batch, model in train mode: soft targets when mixed."""
        if not self.in_pixel_space:
            # The reference's order: normalise first, then augment with contrast clipped to
            # 0..255, which zeroes every negative normalised value in training only.
            normalized = augment_reference_bug(model.normalize(x.float()), self.geometry)
            return model(normalized, normalized=True), y
        x = self.pixels(x)
        if self.mix is None:
            return model(x), y
        x, lam = mix_batch(x, self.mix)
        logits = model(x)
        return logits, mixed_targets(y, lam, logits.shape[-1])
