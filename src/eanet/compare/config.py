"""`CompareConfig`: which models, augmentation orders and seeds to train under one recipe."""

from __future__ import annotations

import dataclasses
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from eanet.errors import ConfigError
from eanet.models.registry import MODELS
from eanet.train.config import AUGMENT_MODES, TrainConfig

# TrainConfig fields that may differ between calls without changing a run's results.
_NOT_RESULTS = ("data_path", "md5", "verify", "device", "threads")

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
)


@dataclass
class CompareConfig:
    """What to compare and the one recipe all runs share (TrainConfig's defaults otherwise)."""

    models: list[str] = field(default_factory=lambda: ["eanet-cifar", "vit-cifar"])
    dataset: str = "cifar100"
    data_path: str | None = None
    md5: str | None = None
    verify: bool = True
    epochs: int = 50
    seeds: int = 1  # runs per model and order, seeds 0..seeds-1
    model_args: dict = field(default_factory=dict)  # overrides applied to every model
    augment_orders: list[str] = field(default_factory=lambda: ["fixed"])
    batch_size: int = 128
    lr: float = 1e-3
    val_fraction: float = 0.2
    image_size: int | None = None
    bench_steps: int = 3  # timed steps per model for img/s; 0 skips the speed measurement
    device: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible option."""
        if not self.models:
            raise ConfigError("--models is empty; name at least one model, e.g. eanet-cifar")
        for name in self.models:
            if name not in MODELS:
                raise ConfigError(f"--models {name!r} is unknown; choose from {', '.join(MODELS)}")
        _no_duplicates("--models", self.models)
        if isinstance(self.seeds, bool) or not isinstance(self.seeds, int) or self.seeds < 1:
            raise ConfigError(f"--seeds {self.seeds!r} must be a positive integer (runs per model)")
        if not self.augment_orders:
            raise ConfigError("--augment-orders is empty; name at least one, e.g. fixed")
        for order in self.augment_orders:
            if order not in AUGMENT_MODES:
                raise ConfigError(
                    f"--augment-orders {order!r} is unknown; choose from {', '.join(AUGMENT_MODES)}"
                )
        _no_duplicates("--augment-orders", self.augment_orders)
        if not isinstance(self.bench_steps, int) or self.bench_steps < 0:
            raise ConfigError(f"--bench-steps {self.bench_steps!r} must be >= 0 (0: no timing)")
        self.train_config(self.models[0], self.augment_orders[0], 0)  # the recipe's own checks

    def train_config(self, model: str, augment: str, seed: int) -> TrainConfig:
        """The TrainConfig of one run: the shared recipe with this model, order and seed."""
        return TrainConfig(
            model=model,
            model_args=dict(self.model_args),
            dataset=self.dataset,
            data_path=self.data_path,
            md5=self.md5,
            verify=self.verify,
            epochs=self.epochs,
            batch_size=self.batch_size,
            lr=self.lr,
            val_fraction=self.val_fraction,
            augment=augment,
            seed=seed,
            device=self.device,
            threads=self.threads,
            image_size=self.image_size,
        )

    def runs(self) -> list[tuple[str, str, int]]:
        """(model, augment order, seed) of every run, in the order they are trained."""
        return [
            (m, a, s) for m in self.models for a in self.augment_orders for s in range(self.seeds)
        ]

    def command(self, out: str | Path) -> str:
        """The `eanet compare` command line that reproduces this comparison."""
        parts = ["eanet", "compare", "--models", *self.models, "--dataset", self.dataset]
        if self.data_path:
            parts += ["--data-path", str(self.data_path)]
        if self.md5:
            parts += ["--md5", self.md5]
        if not self.verify:
            parts.append("--no-verify")
        parts += ["--epochs", str(self.epochs), "--seeds", str(self.seeds)]
        for key, value in self.model_args.items():
            text = value if isinstance(value, str) else json.dumps(value)
            parts += ["--model-arg", f"{key}={text}"]
        parts += ["--augment-orders", *self.augment_orders]
        parts += ["--batch-size", str(self.batch_size), "--lr", str(self.lr)]
        parts += ["--val-fraction", str(self.val_fraction)]
        if self.image_size is not None:
            parts += ["--image-size", str(self.image_size)]
        parts += ["--bench-steps", str(self.bench_steps)]
        if self.device != "auto":
            parts += ["--device", self.device]
        if self.threads is not None:
            parts += ["--threads", str(self.threads)]
        parts += ["--out", str(out)]
        return shlex.join(parts)

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
