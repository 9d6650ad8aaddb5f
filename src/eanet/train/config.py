"""`TrainConfig`: the training recipe; the defaults are the Keras example's, with its bug fixed."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from eanet.errors import ConfigError
from eanet.models.registry import MODELS
from eanet.options import check_field_types
from eanet.train.guard import ON_NONFINITE

AUGMENT_MODES = ("fixed", "reference-bug", "none")


@dataclass
class TrainConfig:
    """The training recipe; the defaults are the Keras example's, with its bug fixed."""

    model: str = "eanet-cifar"
    model_args: dict = field(default_factory=dict)  # overrides of the model config
    dataset: str = "cifar100"
    data_path: str | None = None
    md5: str | None = None  # expected archive checksum when it is not the official file
    verify: bool = True
    epochs: int = 50
    batch_size: int = 128
    eval_batch_size: int = 500
    lr: float = 1e-3
    weight_decay: float = 1e-4
    adam_eps: float = 1e-7  # Keras's default epsilon, not torch's 1e-8
    label_smoothing: float = 0.1
    val_fraction: float = 0.2
    augment: str = "fixed"  # "fixed", "reference-bug" (normalise first, as the reference), "none"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    image_size: int | None = None  # folder data sets: resize images to this side (default 32)
    init_from: str | None = None  # fine-tune: start from this checkpoint's compatible weights
    freeze_backbone: bool = False  # fine-tune: train only the classification head
    compile: bool = False  # torch.compile the model for the training steps
    amp: str = "off"  # "bf16": bfloat16 autocast (and TF32 on CUDA); "off": fp32 as the reference
    on_nonfinite: str = "stop"  # a NaN/inf loss: "stop" training, or "skip" the batch
    deterministic: bool = False  # torch's deterministic algorithms (see train/provenance.py)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible option."""
        check_field_types(self, lambda name, value: f"--{name.replace('_', '-')} {value!r}")
        if self.model not in MODELS:
            raise ConfigError(
                f"--model {self.model!r} is unknown; choose one of {', '.join(MODELS)}"
            )
        for name in ("epochs", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"--{name.replace('_', '-')} {value!r} must be a positive integer"
                )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr {self.lr!r} must be a positive number")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"--weight-decay {self.weight_decay!r} must be >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"--label-smoothing {self.label_smoothing!r} must be in [0, 1)")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction {self.val_fraction!r} must be in [0, 1)")
        if self.amp not in ("off", "bf16"):
            raise ConfigError(f"--amp {self.amp!r} must be 'off' or 'bf16'")
        if self.augment not in AUGMENT_MODES:
            raise ConfigError(
                f"--augment {self.augment!r} must be one of {', '.join(AUGMENT_MODES)}"
            )
        if not self.adam_eps > 0:
            raise ConfigError(f"adam_eps {self.adam_eps!r} must be > 0")
        if self.image_size is not None and (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or self.image_size < 1
        ):
            raise ConfigError(f"--image-size {self.image_size!r} must be a positive integer")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads!r} must be a positive integer")
        if self.on_nonfinite not in ON_NONFINITE:
            raise ConfigError(f"--on-nonfinite {self.on_nonfinite!r} must be 'stop' or 'skip'")
        if self.freeze_backbone and not self.init_from:
            raise ConfigError(
                "--freeze-backbone trains only the head of a pretrained model; "
                "give the model with --init-from CHECKPOINT"
            )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"training options are a {type(data).__name__}, not an object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown training option(s) {', '.join(unknown)}")
        return cls(**data)
