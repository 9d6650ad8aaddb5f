"""The numbers that define an EANet or ViT: `ModelConfig`, defaults = the Keras example's EANet."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from eanet.errors import ConfigError, preview
from eanet.options import check_field_types

ATTENTIONS = ("external", "self")


INITS = ("keras", "trunc_normal")

#: the largest value of each integer option: far beyond any model this package trains, and
#: small enough that a typo (dim=100000, depth=1e9) is one line, not an out-of-memory crash
INT_BOUNDS = {
    "image_size": 4096,
    "patch_size": 4096,
    "in_chans": 64,
    "dim": 16384,
    "depth": 1024,
    "num_heads": 1024,
    "dim_coefficient": 64,
    "mlp_dim": 65536,
    "num_classes": 1_000_000,
}
MAX_MEMORY = 65536
MAX_PARAMETERS = 2_000_000_000


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
        for name, most in INT_BOUNDS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"model option {name}={value!r} must be a positive integer")
            if value > most:
                raise ConfigError(f"model option {name}={value!r} is over its bound of {most:,}")
        if self.memory_size is not None and (
            not isinstance(self.memory_size, int)
            or isinstance(self.memory_size, bool)
            or not 1 <= self.memory_size <= MAX_MEMORY
        ):
            raise ConfigError(
                f"model option memory_size={self.memory_size!r} must be in [1, {MAX_MEMORY:,}]"
            )
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
        if not (math.isfinite(self.ln_eps) and self.ln_eps > 0):
            raise ConfigError(f"model option ln_eps={self.ln_eps!r} must be a finite number > 0")
        self._check_memory()
        self._check_size()

    def _check_size(self) -> None:
        """Refuse a model whose weights alone would not fit a machine (before allocating)."""
        inner = self.dim * (self.dim_coefficient if self.attention == "external" else 4)
        per_block = 2 * self.dim * inner + 2 * self.dim * self.mlp_dim + self.memory_slots**2
        total = self.depth * per_block + self.num_patches * self.dim
        total += self.patch_dim * self.dim + self.dim * self.num_classes
        if total > MAX_PARAMETERS:
            raise ConfigError(
                f"model options give about {total:,} parameters, over the bound of "
                f"{MAX_PARAMETERS:,} ({4 * MAX_PARAMETERS / 2**30:.0f} GiB in fp32); choose "
                "smaller dim, depth, mlp_dim or num_classes"
            )

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
