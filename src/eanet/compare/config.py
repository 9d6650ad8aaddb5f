"""`CompareConfig`: which models, augmentation orders and seeds to train under one recipe."""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from eanet.errors import ConfigError
from eanet.options import check_declared, option, to_argv
from eanet.train.config import AUGMENT_MODES, TrainConfig

# TrainConfig fields that compare sets per run; the rest of the recipe is shared.
PER_RUN = ("model", "augment", "seed")

CURVE_FIELDS = ("train_loss", "val_loss", "train_top1", "val_top1")


# Per-seed figures summarised as mean +- std (fractions, except losses and seconds).
SEED_FIELDS = (
    "best_val_top1",
    "final_val_top1",
    "best_val_top5",
    "final_val_top5",
    "test_top1",
    "test_top5",
    "test_loss",
    "final_train_loss",
    "final_train_top1",
    "first_val_loss",
    "min_val_loss",
    "final_val_loss",
    "train_seconds",
    "steady_train_img_s",
)


@dataclass
class CompareConfig:
    """What to compare, and the one training recipe (`train`) all runs share.

    Each run is `train` with its model, augmentation order and seed set
    (`train_config`); everything else of the recipe is `train`'s.
    """

    models: list[str] = option(
        default_factory=lambda: ["eanet-cifar", "vit-cifar"],
        help="registered models to train side by side (see `eanet models`)",
        metavar="MODEL",
    )
    seeds: int = option(1, help="runs per model and order, seeds 0..K-1", positive=True)
    augment_orders: list[str] = option(
        default_factory=lambda: ["fixed"],
        help="augmentations to train each model with: 'fixed' (pixel space, then normalise), "
        "'reference-bug' (the Keras example's order), 'none', 'crop-flip' (the modern recipe's)",
        choices=AUGMENT_MODES,
        metavar="ORDER",
    )
    bench_steps: int = option(3, help="timed steps per model for img/s, 0 to skip", low=0)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible option; the model names last (the
        registry loads torch): a value out of range is refused at once."""
        check_declared(self)
        if not self.models:
            raise ConfigError("--models is empty; name at least one model, e.g. eanet-cifar")
        if not self.augment_orders:
            raise ConfigError("--augment-orders is empty; name at least one, e.g. fixed")
        _no_duplicates("--augment-orders", self.augment_orders)
        from eanet.models.registry import MODELS  # torch: not at import, for `--help`

        for name in self.models:
            if name not in MODELS:
                raise ConfigError(f"--models {name!r} is unknown; choose from {', '.join(MODELS)}")
        _no_duplicates("--models", self.models)
        self.train_config(self.models[0], self.augment_orders[0], 0)  # the recipe's own checks

    def train_config(self, model: str, augment: str, seed: int) -> TrainConfig:
        """The TrainConfig of one run: the shared recipe with this model, order and seed."""
        return dataclasses.replace(self.train, model=model, augment=augment, seed=seed)

    def runs(self) -> list[tuple[str, str, int]]:
        """(model, augment order, seed) of every run, in the order they are trained."""
        return [
            (m, a, s) for m in self.models for a in self.augment_orders for s in range(self.seeds)
        ]

    def command(self, out: str | Path) -> str:
        """The `eanet compare` command line that reproduces this comparison."""
        parts = ["eanet", "compare", "--models", *self.models]
        parts += to_argv(self, skip=("models", "train"))
        parts += to_argv(self.train, skip=PER_RUN)
        return shlex.join([*parts, "--out", str(out)])

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _no_duplicates(option: str, values: list[str]) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ConfigError(f"{option} lists {v!r} twice; name each once")
        seen.add(v)


def run_name(model: str, augment: str, seed: int) -> str:
    """The directory name of one run under OUT/runs/."""
    return f"{model}-{augment}-seed{seed}"
