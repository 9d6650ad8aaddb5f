"""The numbers that define an EANet or ViT: `ModelConfig`, defaults = the Keras example's EANet."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from eanet.errors import ConfigError
from eanet.options import FRACTION, check_declared, check_known, option

ATTENTIONS = ("external", "self")
INITS = ("keras", "trunc_normal")
GELUS = ("tanh", "erf")

# The `cap` of each integer option: far beyond any model this package trains, and small
# enough that a typo (dim=100000, depth=1e9) is one line, not an out-of-memory crash.
MAX_SIDE = 4096  # image_size, patch_size
MAX_MEMORY = 65536
MAX_PARAMETERS = 2_000_000_000


def _describe(name: str, shown: str) -> str:
    return f"model option {name}={shown}"


@dataclass
class ModelConfig:
    """Every number that defines an EANet or ViT; the defaults are the Keras example's EANet.

    Each field is declared with its help and range (`eanet.options.option`); `--model-arg
    KEY=VALUE` sets one, and `eanet info MODEL` lists them.
    """

    attention: str = option(
        "external",
        help="'external': external attention (EANet); 'self': multi-head self-attention (ViT)",
        choices=ATTENTIONS,
    )
    image_size: int = option(32, help="side of the square input image", positive=True, cap=MAX_SIDE)
    patch_size: int = option(
        2, help="side of a square patch (divides image_size)", positive=True, cap=MAX_SIDE
    )
    in_chans: int = option(3, help="input channels (3: RGB, 1: grey)", positive=True, cap=64)
    dim: int = option(
        64, help="embedding width of a token (Keras: embedding_dim)", positive=True, cap=16384
    )
    depth: int = option(
        8, help="transformer blocks (Keras: num_transformer_blocks)", positive=True, cap=1024
    )
    num_heads: int = option(
        4,
        help="attention heads (divides dim; external attention: times dim_coefficient)",
        positive=True,
        cap=1024,
    )
    dim_coefficient: int = option(
        4,
        help="external attention: heads and inner width are num_heads and dim times this",
        positive=True,
        cap=64,
    )
    mlp_dim: int = option(64, help="hidden width of each block's MLP", positive=True, cap=65536)
    memory_size: int | None = option(
        None,
        help="external attention: memory units S of M_k and M_v (None: dim // dim_coefficient)",
        positive=True,
        cap=MAX_MEMORY,
    )
    memory_bias: bool = option(True, help="external attention: the memories M_k, M_v have biases")
    attn_drop: float = option(0.2, help="dropout on the attention weights", **FRACTION)
    proj_drop: float = option(
        0.2,
        help="external attention: dropout after the output projection (ViT: none, as Keras)",
        **FRACTION,
    )
    mlp_drop: float = option(0.2, help="dropout after each MLP layer", **FRACTION)
    num_classes: int = option(100, help="classes of the head", positive=True, cap=1_000_000)
    gelu: str = option(
        "tanh",
        help="the MLP's GELU: 'tanh' approximation (Keras ops.gelu's default) or exact 'erf'",
        choices=GELUS,
    )
    ln_eps: float = option(1e-5, help="LayerNorm epsilon", positive=True)
    init: str = option(
        "keras",
        help="weight init: 'keras' (Glorot-uniform, Keras's fans) or 'trunc_normal' (std "
        "0.02, the paper's code)",
        choices=INITS,
    )
    drop_path: float = option(
        0.0,
        help="stochastic depth of the last block, linear from 0 over the blocks (0: off, as Keras)",
        **FRACTION,
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible field: its type, choice or range
        (declared with each field), then the sizes that must fit together."""
        check_declared(self, _describe)
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
        check_known(data, cls, "model option")
        return cls(**data)
