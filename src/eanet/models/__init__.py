"""EANet and its ViT baseline, built exactly as the Keras example builds them.

`config` (ModelConfig), `native` (hand-written CPU kernels, compiled at first use) ->
`fused` (fast elementwise ops) -> `layers` -> `transformer`
(EANet, ViT) -> `registry` (named variants). The public names are re-exported here.
"""

from eanet.models.config import ModelConfig
from eanet.models.layers import use_reference_ops
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
    "use_reference_ops",
]
