"""Named model variants (`eanet-cifar`, `vit-cifar`, ...) and how to build them."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from eanet.errors import ConfigError
from eanet.models.config import ModelConfig
from eanet.models.transformer import EANet, VisionTransformer, ViT
from eanet.options import check_known


@dataclass(frozen=True)
class ModelSpec:
    """A named variant: its config and a one-line description."""

    config: ModelConfig
    description: str


# Fashion-MNIST's own input: 28x28, one channel; 4x4 patches give 7x7 = 49 tokens (2x2 would
# give 196, four times as many). Depth and widths stay the reference's.
_FASHION: dict = {"image_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10}


MODELS: dict[str, ModelSpec] = {
    "eanet-cifar": ModelSpec(
        ModelConfig(), "EANet of the Keras example (external attention, S=16)"
    ),
    "vit-cifar": ModelSpec(
        ModelConfig(attention="self"),
        "ViT baseline of the Keras example (4 heads of width 64)",
    ),
    "eanet-cifar-s64": ModelSpec(
        ModelConfig(memory_size=64, memory_bias=False, init="trunc_normal"),
        "paper-style EANet: memory size S=64, bias-free memories, truncated-normal init",
    ),
    "eanet-fashion": ModelSpec(
        ModelConfig(**_FASHION),
        "EANet of the Keras example for 28x28 grey images (4x4 patches, 49 tokens)",
    ),
    "vit-fashion": ModelSpec(
        ModelConfig(attention="self", **_FASHION),
        "ViT baseline for 28x28 grey images (4x4 patches, 49 tokens)",
    ),
}


def model_config(name: str, **overrides: object) -> ModelConfig:
    """The config of a registered variant with `overrides` applied (validated)."""
    if name not in MODELS:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    check_known(overrides, ModelConfig, "model option")
    return ModelConfig(**{**MODELS[name].config.to_dict(), **overrides})


def build_model(cfg: ModelConfig) -> VisionTransformer:
    """A freshly initialised model for `cfg`."""
    return EANet(cfg) if cfg.attention == "external" else ViT(cfg)


def create_model(name: str = "eanet-cifar", **overrides: object) -> VisionTransformer:
    """A registered variant by name, e.g. `create_model("vit-cifar", num_classes=10)`."""
    return build_model(model_config(name, **overrides))


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; the 7 normalization statistics are buffers."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
