"""EANet and its ViT baseline, built exactly as the Keras example builds them.

`config` (ModelConfig) -> `layers` -> `transformer` (EANet, ViT) -> `registry` (named
variants), in plain torch ops; the public names are re-exported here. What makes them
fast lives in `eanet.accel`, which swaps faster equivalents in from outside.
"""

from eanet.models.config import ModelConfig
from eanet.models.registry import (
    MODELS,
    ModelSpec,
    build_model,
    count_parameters,
    create_model,
    model_config,
)
from eanet.models.transformer import EANet, VisionTransformer, ViT

__all__ = [
    "MODELS",
    "EANet",
    "ModelConfig",
    "ModelSpec",
    "ViT",
    "VisionTransformer",
    "build_model",
    "count_parameters",
    "create_model",
    "model_config",
]
