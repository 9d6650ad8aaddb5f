"""The numbers that define an EANet or ViT: `ModelConfig`, defaults = the Keras example's EANet."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from eanet.errors import ConfigError, preview
from eanet.options import check_field_types

ATTENTIONS = ("external", "self")


INITS = ("keras", "trunc_normal")


@dataclass
class ModelConfig:
    """Every number that defines an EANet or ViT; the defaults are the Keras example's EANet."""

    attention: str = "external"  # "external" (EANet) or "self" (ViT)
    image_size: int = 32
    patch_size: int = 2
    in_chans: int = 3
    dim: int = 64  # embedding_dim
    depth: int = 8  # num_transformer_blocks
    num_heads: int = 4
    dim_coefficient: int = 4  # external attention: heads *= 4, inner width = dim * 4
    mlp_dim: int = 64
    memory_size: int | None = None  # external attention S; None = dim // dim_coefficient (16)
    memory_bias: bool = True
    attn_drop: float = 0.2
    proj_drop: float = 0.2
    mlp_drop: float = 0.2
    num_classes: int = 100
    gelu: str = "tanh"  # Keras `ops.gelu` defaults to the tanh approximation
    ln_eps: float = 1e-5
    init: str = "keras"  # "keras" (Glorot-uniform, Keras fans) or "trunc_normal" (paper code)
    drop_path: float = 0.0  # stochastic depth of the last block, linear from 0 (0: off, as Keras)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible field."""
        check_field_types(self, lambda name, shown: f"model option {name}={shown}")
        _choice("attention", self.attention, ATTENTIONS)
        _choice("init", self.init, INITS)
        _choice("gelu", self.gelu, ("tanh", "erf"))
        for name in (
            "image_size",
            "patch_size",
            "in_chans",
            "dim",
            "depth",
            "num_heads",
            "dim_coefficient",
            "mlp_dim",
            "num_classes",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model option {name}={value!r} must be a positive integer")
        if self.memory_size is not None and (
            not isinstance(self.memory_size, int) or self.memory_size < 1
        ):
            raise ConfigError(f"model option memory_size={self.memory_size!r} must be >= 1")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"patch_size={self.patch_size} does not divide image_size={self.image_size}; "
                "choose a patch size that divides the image size"
            )
        if self.dim % self.num_heads:
            raise ConfigError(
                f"dim={self.dim} is not divisible by num_heads={self.num_heads}; "
                "choose dim as a multiple of num_heads"
            )
        for name in ("attn_drop", "proj_drop", "mlp_drop", "drop_path"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise ConfigError(f"model option {name}={value!r} must be in [0, 1)")
        if not self.ln_eps > 0:
            raise ConfigError(f"model option ln_eps={self.ln_eps!r} must be > 0")
        self._check_memory()

    def _check_memory(self) -> None:
        """External attention's memory S (memory_size, or dim // dim_coefficient) must be > 0;
        the other derived sizes (heads, inner width, head width, patches) are > 0 once the
        checks above hold."""
        if self.attention == "external" and self.memory_slots < 1:
            raise ConfigError(
                f"model options dim={self.dim} and dim_coefficient={self.dim_coefficient} give "
                "an external-attention memory of dim // dim_coefficient = 0 slots; set "
                "memory_size=N, or a dim of at least dim_coefficient"
            )

    @property
    def memory_slots(self) -> int:
        """S, the external attention's memory slots: memory_size, or dim // dim_coefficient."""
        return self.memory_size or self.dim // self.dim_coefficient

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_chans

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ModelConfig:
        """Build from a saved dict; unknown keys are an error, not silently dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown model option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        return cls(**data)


def _choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(
            f"model option {name}={preview(value)} must be one of {', '.join(choices)}"
        )
