"""`TrainConfig`: the training recipe; the defaults are the Keras example's, with its bug fixed."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

from eanet.choices import DATASET_NAMES, ON_NONFINITE, PRECISIONS
from eanet.errors import ConfigError, preview
from eanet.options import CHANGE, FRACTION, KEEP, check_declared, check_known, option
from eanet.train.recipes import DEFAULT_RECIPE, recipe_names
from eanet.train.schedule import SCHEDULES

AUGMENT_MODES = ("fixed", "reference-bug", "none", "crop-flip")
COMPILE_MODES = ("default", "max-autotune", "reduce-overhead")  # torch.compile's modes
LR_SCALINGS = ("none", "linear")
REFERENCE_BATCH = 128  # the batch the reference's learning rate was chosen for
MAX_COUNT = 1_000_000  # epochs, batch sizes: a typo (1e12) is one line, not an endless run
MAX_SYNTHETIC = 1_000_000  # synthetic images (3 KB each at 32x32x3)
DECAY_PARAMS = ("all", "matrices")
LOGGERS = ("none", "tensorboard")

# The headings of `eanet train --help`, in order; each option names its own (`group=`).
RUN, DATA, MODEL, RECIPE = "run directory and logging", "data", "model", "recipe and optimiser"
AUGMENTATION, SPEED = "augmentation and regularisation", "precision and speed"
DISTRIBUTED = "distributed"
GROUPS = (RUN, DATA, MODEL, RECIPE, AUGMENTATION, SPEED, DISTRIBUTED)


@dataclass
class TrainConfig:
    """The training recipe; the defaults are the Keras example's, with its bug fixed.

    Each field is declared once with its help and its rule on `--resume` (`eanet.options`):
    the flags of `eanet train`, `compare` and `bench`, config files and resume merging are
    derived from these declarations.
    """

    model: str = option("eanet-cifar", help="registered model (see `eanet models`)", group=MODEL)
    model_args: dict = option(
        default_factory=dict,
        help="override a model config field, repeatable (e.g. --model-arg depth=2 "
        "--model-arg memory_size=64); `eanet info MODEL` lists the fields",
        metavar="KEY=VALUE",
        group=MODEL,
    )
    dataset: str = option(
        "cifar100",
        help="data set; 'fashion-mnist': 70,000 real 28x28 grey clothing photos (padded to "
        "32x32 RGB for the cifar models, native for eanet-fashion/vit-fashion); "
        "'folder': your images, one subfolder per class, in --data-path; "
        "'digits': 1,797 real handwritten digits shipped with eanet, at 32x32, a fixed "
        "quarter as test; "
        "'synthetic': random CIFAR-100-shaped images, only for timing the recipe",
        choices=DATASET_NAMES,
        group=DATA,
    )
    data_path: str | None = option(
        None,
        help="CIFAR: archive (.tar.gz), extracted folder, or a directory holding the "
        "archive, downloaded there if missing; fashion-mnist: the folder of its four idx "
        "files; folder: the directory of class subfolders",
        shown_default="CIFAR: $EANET_DATA or ~/.cache/eanet",
        resume=CHANGE,
        results=False,
        group=DATA,
    )
    md5: str | None = option(
        None,
        help="expected md5 of an archive that is not the official one",
        resume=CHANGE,
        results=False,
        group=DATA,
    )
    verify: bool = option(
        True,
        help="check the md5 of a local archive, or fashion-mnist's sha256 of its files' "
        "contents (--no-verify: one you trust)",
        resume=CHANGE,
        results=False,
        group=DATA,
    )
    epochs: int = option(
        50,
        help="passes over the training set",
        resume=CHANGE,
        group=RECIPE,
        low=1,
        high=MAX_COUNT,
    )
    batch_size: int = option(
        128,
        help="images per optimizer step (over all processes under torchrun)",
        group=RECIPE,
        low=1,
        high=MAX_COUNT,
    )
    eval_batch_size: int = option(
        500,
        help="images per forward pass for validation/test (bounds memory)",
        resume=CHANGE,
        group=SPEED,
        low=1,
        high=MAX_COUNT,
    )
    lr: float = option(
        1e-3,
        help="AdamW learning rate (constant; the peak with --lr-schedule cosine)",
        group=RECIPE,
        positive=True,
    )
    weight_decay: float = option(1e-4, help="AdamW decoupled weight decay", group=RECIPE, low=0)
    adam_eps: float = option(
        1e-7, help="AdamW epsilon (Keras's default, not torch's 1e-8)", group=RECIPE, positive=True
    )
    adam_eps_rule: str = option(
        "keras",
        help="where AdamW adds its epsilon: 'keras' to sqrt(v) before the bias correction, "
        "as the reference's Keras AdamW does; 'torch' to the bias-corrected sqrt(v), as "
        "torch.optim.AdamW does",
        choices=("keras", "torch"),
        group=RECIPE,
    )
    label_smoothing: float = option(
        0.1,
        help="label smoothing of the cross-entropy",
        group=AUGMENTATION,
        **FRACTION,
    )
    val_fraction: float = option(
        0.2,
        help="fraction of the training set held out for validation, taken from its end "
        "as Keras does",
        group=DATA,
        **FRACTION,
    )
    augment: str = option(
        "fixed",
        help="'fixed': augment in pixel space, then normalise; 'reference-bug': the Keras "
        "example's order (normalise, then contrast clipped to 0..255), only to reproduce "
        "its failure; 'none'; 'crop-flip': random resized crop (area 0.8..1) and "
        "horizontal flip (the modern recipe's)",
        choices=AUGMENT_MODES,
        group=AUGMENTATION,
    )
    seed: int = option(
        0,
        help="random seed (weights, order, augmentation, dropout)",
        group=RECIPE,
        low=0,
        high=2**63,
        high_open=True,
    )
    device: str = option(
        "auto", help="auto, cpu, cuda or cuda:N", resume=CHANGE, results=False, group=SPEED
    )
    threads: int | None = option(
        None,
        help="CPU threads for torch",
        shown_default="one per core",
        resume=CHANGE,
        results=False,
        group=SPEED,
        positive=True,
    )
    image_size: int | None = option(
        None,
        help="--dataset folder or digits: resize every image to this side",
        shown_default="32; with --init-from: the checkpoint's",
        group=DATA,
        positive=True,
    )
    init_from: str | None = option(
        None,
        help="fine-tune: start from every tensor of this run directory or checkpoint that "
        "fits (same name and shape); a new head when the classes differ; normalization "
        "statistics from the new data; its architecture unless --model/--model-arg is given",
        resume=KEEP,
        metavar="CHECKPOINT",
        group=MODEL,
    )
    freeze_backbone: bool = option(
        False, help="with --init-from: train only the classification head", group=MODEL
    )
    compile: bool = option(
        False,
        help="torch.compile the model: the training step in `train`, the forward pass in "
        "evaluate, predict and serve (compiling takes tens of seconds to minutes; on the CPU "
        "it pays for inference, see docs/speed.md)",
        resume=CHANGE,
        group=SPEED,
    )
    precision: str = option(
        "fp32",
        help="'fp32': the reference's numerics; 'bf16': bfloat16 autocast (+TF32 on CUDA); "
        "'auto': bf16 where the device computes it natively and faster (CUDA with bf16; a CPU "
        "with avx512_bf16 or AMX, torch and oneDNN allowed to use it, and a matmul probe, "
        "cached per machine, finding bf16 faster), else fp32",
        choices=PRECISIONS,
        group=SPEED,
    )
    accel: bool = option(
        True,
        help="run the model with eanet.accel's faster equivalents of its layers (folded "
        "memories, fused attention, native CPU kernels; same function, see docs/internals.md); "
        "--no-accel: the plain model's torch ops",
        resume=CHANGE,
        group=SPEED,
    )
    on_nonfinite: str = option(
        "stop",
        help="a NaN or infinite training loss: 'stop' training, keeping the last complete "
        "epoch's checkpoint, or 'skip' the batch (no optimizer step; counted in the "
        "history as skipped_batches)",
        choices=ON_NONFINITE,
        resume=CHANGE,
        group=RECIPE,
    )
    deterministic: bool = option(
        False,
        help="torch's deterministic algorithms, cuDNN deterministic, no benchmark, "
        "CUBLAS_WORKSPACE_CONFIG=:4096:8: repeatable GPU runs, maybe slower",
        group=SPEED,
    )
    compile_mode: str = option(
        "default",
        help="with --compile: torch.compile's mode; 'max-autotune' searches for faster "
        "kernels (minutes of compiling), 'reduce-overhead' replays CUDA graphs (CUDA only)",
        choices=COMPILE_MODES,
        resume=CHANGE,
        group=SPEED,
    )
    lr_scaling: str = option(
        "none",
        help="'linear': AdamW's learning rate is --lr * --batch-size / 128, the linear "
        "scaling rule for batches larger than the reference's 128; 'none': --lr as given",
        choices=LR_SCALINGS,
        group=RECIPE,
    )
    synthetic_images: int = option(
        50_000,
        help="--dataset synthetic: training images (the last --val-fraction of them "
        "validate) and a fifth as many test images; 50,000 as in CIFAR-100",
        group=DATA,
        low=5,
        high=MAX_SYNTHETIC,
    )

    # ------------------------------------------------------------ recipe ingredients
    # Every one off by default: the reference recipe is the defaults (`--recipe`).
    recipe: str = option(
        DEFAULT_RECIPE,
        help="named recipe whose values are the starting point (see `eanet recipes`); "
        "--config FILE and flags override it",
        choices=recipe_names(),
        group=RECIPE,
    )
    lr_schedule: str = option(
        "constant",
        help="'constant' (the reference); 'cosine': linear warm-up over --warmup-fraction "
        "of all steps from --warmup-lr, then cosine down to --min-lr, set every step",
        choices=SCHEDULES,
        group=RECIPE,
    )
    warmup_fraction: float = option(
        0.0, help="cosine: fraction of all steps spent warming up", group=RECIPE, low=0, high=1
    )
    warmup_lr: float = option(
        0.0, help="cosine: learning rate at the first step", group=RECIPE, low=0
    )
    min_lr: float = option(0.0, help="cosine: learning rate at the last step", group=RECIPE, low=0)
    weight_decay_params: str = option(
        "all",
        help="tensors AdamW decays: 'all' trainable (the reference) or 'matrices' (weight "
        "matrices only: no biases, LayerNorm or position embedding)",
        choices=DECAY_PARAMS,
        group=RECIPE,
    )
    grad_clip: float = option(
        0.0, help="clip the gradient norm to this (0: off)", group=RECIPE, low=0
    )
    ema_decay: float = option(
        0.0,
        help="keep an exponential moving average of the weights with this decay, validated "
        "each epoch and saved (0: off; e.g. 0.9999)",
        group=RECIPE,
        **FRACTION,
    )
    randaugment_ops: int = option(
        0, help="RandAugment: operations per image (0: off)", group=AUGMENTATION, low=0
    )
    randaugment_magnitude: float = option(
        9.0, help="RandAugment: magnitude", group=AUGMENTATION, low=0, high=10
    )
    randaugment_magnitude_std: float = option(
        0.0, help="RandAugment: per-image noise (std) on the magnitude", group=AUGMENTATION, low=0
    )
    mixup_alpha: float = option(
        0.0, help="mixup: Beta(alpha, alpha) mixing factor (0: off)", group=AUGMENTATION, low=0
    )
    cutmix_alpha: float = option(
        0.0, help="CutMix: Beta(alpha, alpha) box area (0: off)", group=AUGMENTATION, low=0
    )
    mix_prob: float = option(
        1.0,
        help="probability that a batch is mixed (mixup/CutMix)",
        group=AUGMENTATION,
        low=0,
        high=1,
    )
    mix_switch_prob: float = option(
        0.5,
        help="with mixup and CutMix on: probability of CutMix for a batch",
        group=AUGMENTATION,
        low=0,
        high=1,
    )
    erase_prob: float = option(
        0.0,
        help="random erasing: probability per image (0: off)",
        group=AUGMENTATION,
        low=0,
        high=1,
    )
    log: str = option(
        "none",
        help="'tensorboard': also write TensorBoard events to RUN/tensorboard/ (needs "
        "pip install 'eanet[tensorboard]'); the CSV/JSON history is always written",
        choices=LOGGERS,
        resume=CHANGE,
        results=False,
        group=RUN,
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first impossible option: its type, choice or range
        (declared with each field), then the rules that join several options."""
        check_declared(self)  # --model is checked by `check_model`: the registry loads torch
        if self.compile_mode != "default" and not self.compile:
            raise ConfigError(
                f"--compile-mode {self.compile_mode} applies to torch.compile; add --compile"
            )
        if self.synthetic_images != 50_000 and self.dataset != "synthetic":
            raise ConfigError(
                f"--synthetic-images applies to --dataset synthetic, not {self.dataset}; drop it"
            )
        if self.augment == "reference-bug" and self.uses_pixel_extras:
            raise ConfigError(
                "--augment reference-bug normalises before augmenting; RandAugment, random "
                "erasing and mixup/CutMix work in pixel space: drop them or use another --augment"
            )
        if self.freeze_backbone and not self.init_from:
            raise ConfigError(
                "--freeze-backbone trains only the head of a pretrained model; "
                "give the model with --init-from CHECKPOINT"
            )

    def check_model(self) -> None:
        """Raise ConfigError unless --model names a registered model and --model-arg's
        options make a valid one (imports torch): before any data is downloaded."""
        from eanet.models.registry import MODELS, model_config

        if self.model not in MODELS:
            raise ConfigError(
                f"--model {preview(self.model)} is unknown; choose one of {', '.join(MODELS)}"
            )
        if not isinstance(self.model_args, dict):
            raise ConfigError(f"model_args {preview(self.model_args)} must be a mapping")
        model_config(self.model, **self.model_args)

    @property
    def uses_pixel_extras(self) -> bool:
        """Whether RandAugment, random erasing or mixup/CutMix is on."""
        mixing = self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)
        return self.randaugment_ops > 0 or self.erase_prob > 0 or mixing

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: Mapping[str, object]) -> TrainConfig:
        """A new, validated config: these options with `overrides` (field names) applied."""
        return type(self)(**{**self.to_dict(), **overrides})

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"training options are a {type(data).__name__}, not an object")
        check_known(data, cls, "training option")
        return cls(**data)
