"""Training: the Keras example's recipe (AdamW, label smoothing, last-20% validation) in one loop.

Data stay uint8 tensors on the training device; each batch is a `randperm` slice,
augmented on the device in pixel space and only then normalised (inside the model): the
fix of the reference's bug. Every epoch writes an atomic checkpoint with optimizer and RNG
state, so `resume` continues bit-for-bit where an interrupted run stopped.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eanet import __version__, checkpoint, distributed, finetune, reliability
from eanet.augment import AugmentConfig, augment, augment_reference_bug
from eanet.data import ImageData, compute_normalization, load_dataset, train_val_split
from eanet.errors import ConfigError, EANetError
from eanet.evaluate import Metrics, MetricSums, evaluate_tensors
from eanet.fileio import read_json, write_csv, write_json
from eanet.models import MODELS, VisionTransformer, build_model, model_config
from eanet.plots import plot_curves
from eanet.runtime import environment, set_threads, tune_cpu_allocator
from eanet.typecheck import check_field_types

log = logging.getLogger(__name__)

AUGMENT_MODES = ("fixed", "reference-bug", "none")
RUN_FILES = (
    "config.json",
    "history.json",
    "history.csv",
    "curves.png",
    "metrics.json",
    checkpoint.CHECKPOINT_NAME,
)


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
    deterministic: bool = False  # torch's deterministic algorithms (see reliability.py)

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
        if self.on_nonfinite not in reliability.ON_NONFINITE:
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


# --------------------------------------------------------------------------- one step


def forward_train(
    model: VisionTransformer, x: torch.Tensor, mode: str, aug: AugmentConfig
) -> torch.Tensor:
    """Augment a uint8 batch as `mode` says and return the logits (model in train mode)."""
    x = x.float()
    if mode == "fixed":
        return model(augment(x, aug))  # pixel space, then normalise inside the model
    if mode == "reference-bug":
        # The reference's order: normalise first, then augment with contrast clipped to
        # 0..255, which zeroes every negative normalised value in training only.
        return model(augment_reference_bug(model.normalize(x), aug), normalized=True)
    return model(x)


def accelerate(model: VisionTransformer, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The module the training steps call: the model, or torch.compile of it (--compile).

    With --amp bf16 on CUDA, fp32 matmuls outside autocast may use TF32 too.
    """
    if cfg.amp == "bf16" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not cfg.compile:
        return model
    log.info("compiling the model with torch.compile (the first steps are slow)")
    return torch.compile(model)


def make_optimizer(model: VisionTransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """The reference's AdamW (decoupled decay on every trainable tensor, Keras's epsilon)."""
    return torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr,
        betas=(0.9, 0.999),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
    )


def train_step(
    model: VisionTransformer,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    aug: AugmentConfig,
    loss_scale: float = 1.0,
    guard: reliability.StepGuard | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment, forward, label-smoothed loss, backward, AdamW step; returns (logits, loss).

    `loss_scale` weights the gradient (not the returned loss): a rank's share of a short
    last batch under DDP (see `distributed.Distributed.shard`). `guard` may veto the
    optimizer step of a non-finite batch: then `reliability.BatchSkipped` is raised.
    """
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=cfg.amp == "bf16"):
        logits = forward_train(model, x, cfg.augment, aug)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    (loss if loss_scale == 1.0 else loss * loss_scale).backward()
    if guard is not None and not guard.allow_step(loss, optimizer):
        optimizer.zero_grad(set_to_none=True)
        raise reliability.BatchSkipped
    optimizer.step()
    return logits.detach(), loss.detach()


def train_epoch(
    model: VisionTransformer,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    desc: str = "train",
    progress: bool = True,
    dist: distributed.Distributed | None = None,
    guard: reliability.StepGuard | None = None,
) -> Metrics:
    """One pass over the training tensors in a fresh random order, last batch partial.

    With `dist` (inside its `epoch_rng`), the order is the one every rank shares and
    this process trains on its share of each global batch; the metrics are its own.
    With `guard`, a signal stops training between steps and a non-finite loss stops it
    or skips the batch (`reliability.StepGuard`); skipped batches are not in the metrics.
    """
    model.train()
    aug = AugmentConfig()
    sums = MetricSums(images.device)
    if dist is None:
        perm = torch.randperm(len(images), device=images.device)
    else:
        perm = dist.permutation(len(images), images.device)
    steps = math.ceil(len(images) / cfg.batch_size)
    bar = tqdm(range(steps), desc=desc, disable=not progress, leave=False, unit="step")
    if guard is not None:
        guard.start_epoch(desc, steps)
    for step in bar:
        if guard is not None:
            guard.before_step(step)
        idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        scale = 1.0
        if dist is not None:
            idx, scale = dist.shard(idx)
        x, y = images[idx], labels[idx]
        try:
            logits, loss = train_step(model, optimizer, x, y, cfg, aug, scale, guard)
        except reliability.BatchSkipped:
            continue
        if scale:  # weight 0: a stand-in image, only there to join the gradient average
            sums.add(logits, y, loss)
        if progress and (step % 10 == 0 or step == steps - 1):
            m = sums.result()
            rate = m.count / max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix(
                loss=f"{m.loss:.3f}",
                top1=f"{m.top1:.1%}",
                top5=f"{m.top5:.1%}",
                img_s=f"{rate:.0f}",
            )
    if guard is not None:
        guard.end_epoch(model)
    return sums.result()


# --------------------------------------------------------------------------- run directory


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber an existing run unless asked; check the directory is writable.

    Temporary files that a killed writer left beside the run files are deleted.
    """
    ckpt = out / checkpoint.CHECKPOINT_NAME
    if resume:
        if not ckpt.is_file():
            raise EANetError(
                f"{out}: nothing to resume (no {checkpoint.CHECKPOINT_NAME}); "
                "start a new run with --out"
            )
    else:
        existing = [name for name in RUN_FILES if (out / name).exists()]
        if existing and not overwrite:
            raise EANetError(
                f"{out} already holds a run ({', '.join(existing)}); pass --resume "
                f"{out} to continue it, --overwrite to start over, or another --out"
            )
        for name in existing:
            (out / name).unlink()
    reliability.remove_stale_temp_files(out, RUN_FILES)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        raise EANetError(f"cannot write to run directory {out}: {exc.strerror or exc}") from exc


def write_history(out: Path, history: list[dict], title: str) -> None:
    write_json(out / "history.json", history)
    write_csv(out / "history.csv", history)
    plot_curves(history, out / "curves.png", title=title)


def _fmt(prefix: str, m: Metrics) -> str:
    return f"{prefix} loss {m.loss:.4f} top1 {m.top1:.2%} top5 {m.top5:.2%}"


# --------------------------------------------------------------------------- fit


def load_data(cfg: TrainConfig, progress: bool = True) -> ImageData:
    """The data set a training config names (archive, folder, digits or synthetic)."""
    return load_dataset(
        cfg.dataset,
        cfg.data_path,
        md5=cfg.md5,
        verify=cfg.verify,
        progress=progress,
        image_size=cfg.image_size,
    )


def build_for_data(cfg: TrainConfig, data: ImageData) -> VisionTransformer:
    """The model named by `cfg`, sized for `data` (classes, image size), stats from its images."""
    _, c, h, w = data.train_images.shape
    if h != w:
        raise ConfigError(f"{data.name}: images are {h}x{w}; the model needs square images")
    args = {"num_classes": data.num_classes, "image_size": h, "in_chans": c, **cfg.model_args}
    if args["num_classes"] != data.num_classes:
        raise ConfigError(
            f"--model-arg num_classes={args['num_classes']} but {data.name} has "
            f"{data.num_classes} classes; drop the override"
        )
    if (args["image_size"], args["in_chans"]) != (h, c):
        raise ConfigError(
            f"model input {args['in_chans']}x{args['image_size']}x"
            f"{args['image_size']} does not match {data.name} images {c}x{h}x{w}"
        )
    model = build_model(model_config(cfg.model, **args))
    # As the reference (`adapt(x_train)`): statistics over the whole training archive.
    mean, var, count = compute_normalization(data.train_images)
    model.normalize.set_stats(mean, var, count)
    return model


@reliability.graceful_interrupts  # Ctrl-C/SIGTERM: stop between steps, keep the last epoch
def fit(
    cfg: TrainConfig,
    out: str | Path,
    *,
    data: ImageData | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Train (or resume) a run in `out`; returns the final test metrics (fractions).

    Started by torchrun (or inside a process group), every process calls this and they
    train one model with DDP; `eanet.distributed` says what is global and what per rank.
    """
    out = Path(out)
    cfg.validate()
    reliability.configure_determinism(cfg.deterministic)  # before CUDA starts
    dist = distributed.setup(cfg.device)  # a process group only under torchrun
    dist.check_batch(cfg.batch_size)
    progress = progress and dist.is_main
    dist.from_main(prepare_run_dir, out, resume, overwrite)  # only rank 0 touches `out`
    set_threads(cfg.threads)
    device = dist.device
    tune_cpu_allocator()
    torch.manual_seed(cfg.seed)
    if data is None:
        with dist.local_main_first():  # one download per node
            data = load_data(cfg, progress)
    model = build_for_data(cfg, data).to(device)
    if cfg.init_from and not resume:  # a resumed run has its own weights
        finetune.load_compatible(model, cfg.init_from, data.class_names)
    if cfg.freeze_backbone:
        finetune.freeze_backbone(model)
    optimizer = make_optimizer(model, cfg)
    train_x, train_y, val_x, val_y = (t.to(device) for t in train_val_split(data, cfg.val_fraction))
    history: list[dict] = []
    start = 1
    if resume:
        ckpt = dist.from_main(checkpoint.load, out)  # every rank restores rank 0's file
        if ckpt.class_names != data.class_names:
            raise EANetError(
                f"{out}: the checkpoint was trained on other classes than "
                f"{data.name}; resume it with its own data set"
            )
        checkpoint.restore_training(model, optimizer, ckpt, out)  # weights, AdamW, RNG
        history = ckpt.meta["history"]
        start = ckpt.meta["epoch"] + 1
        log.info("resuming %s after epoch %d of %d", out, start - 1, cfg.epochs)
        if dist.is_main:
            write_history(out, history, f"{cfg.model} on {data.name}")  # in case the kill beat it
    if dist.is_main:
        write_json(
            out / "config.json",
            {
                "train": cfg.to_dict(),
                "model": model.config.to_dict(),
                "dataset": {
                    "name": data.name,
                    "classes": data.num_classes,
                    "train_images": len(train_x),
                    "val_images": len(val_x),
                    "test_images": len(data.test_images),
                },
                "eanet_version": __version__,
                "environment": environment(),
                "distributed": dist.describe(),
                "reproducibility": reliability.provenance(cfg, device),
            },
        )
    title = f"{cfg.model} on {data.name}"
    meta = {
        "model_name": cfg.model,
        "class_names": data.class_names,
        "train_config": cfg.to_dict(),
        "eanet_version": __version__,
    }
    runner = accelerate(dist.wrap(model), cfg, device)  # DDP under torchrun; saves use `model`
    guard = reliability.StepGuard(cfg.on_nonfinite, cfg.lr, out)
    for epoch in range(start, cfg.epochs + 1):
        t0 = time.perf_counter()
        with dist.epoch_rng(cfg.seed, epoch):
            tr = train_epoch(
                runner,
                optimizer,
                train_x,
                train_y,
                cfg,
                desc=f"epoch {epoch}/{cfg.epochs}",
                progress=progress,
                dist=dist if dist.enabled else None,
                guard=guard,
            )
        tr = dist.all_reduce(tr)  # every rank logs the figures over all ranks' images
        train_s = time.perf_counter() - t0
        va = evaluate_tensors(
            model, *dist.eval_shard(val_x, val_y), cfg.eval_batch_size, cfg.label_smoothing
        )
        va = dist.all_reduce(va)
        row = {
            "epoch": epoch,
            "train_loss": tr.loss,
            "train_top1": tr.top1,
            "train_top5": tr.top5,
            "val_loss": va.loss if va.count else None,
            "val_top1": va.top1 if va.count else None,
            "val_top5": va.top5 if va.count else None,
            "train_seconds": round(train_s, 3),
            "epoch_seconds": round(time.perf_counter() - t0, 3),
            "train_images_per_s": round(tr.count / train_s, 2),
        }
        if cfg.on_nonfinite == "skip":
            row["skipped_batches"] = guard.skipped  # batches with a NaN/inf loss, not stepped
        history.append(row)
        if dist.is_main:
            checkpoint.save(
                out / checkpoint.CHECKPOINT_NAME,
                model,
                {**meta, "epoch": epoch, "history": history},
                optimizer,
                rng=True,
            )
            write_history(out, history, title)
        log.info(
            "epoch %d/%d  %s | %s | %.1fs %.0f img/s",
            epoch,
            cfg.epochs,
            _fmt("train", tr),
            _fmt("val", va) if va.count else "no validation",
            row["epoch_seconds"],
            row["train_images_per_s"],
        )
        guard.epoch_saved()  # a Ctrl-C during validation or saving stops here
    test = evaluate_tensors(
        model,
        *dist.eval_shard(data.test_images.to(device), data.test_labels.to(device)),
        cfg.eval_batch_size,
        cfg.label_smoothing,
        progress=progress,
        desc="test",
    )
    test = dist.all_reduce(test)
    metrics = {
        "test_loss": test.loss,
        "test_top1": test.top1,
        "test_top5": test.top5,
        "test_images": test.count,
        "epochs": cfg.epochs,
        "model": cfg.model,
        "dataset": data.name,
    }
    vals = [h["val_top1"] for h in history if h["val_top1"] is not None]
    if vals:
        metrics["best_val_top1"] = max(vals)
        metrics["final_val_top1"] = vals[-1]
    if dist.is_main:
        write_json(out / "metrics.json", metrics)
    log.info("%s (%d images)", _fmt("test", test), test.count)
    dist.close()
    return metrics


def load_run_config(run_dir: str | Path) -> TrainConfig:
    """The TrainConfig saved in a run directory's config.json."""
    data = read_json(Path(run_dir) / "config.json")
    if "train" not in data:
        raise EANetError(f"{run_dir}/config.json has no 'train' section; it is not a run")
    try:
        return TrainConfig.from_dict(data["train"])
    except ConfigError as exc:
        raise ConfigError(
            f"{Path(run_dir) / 'config.json'}: {exc}; correct the file (or start a new run)"
        ) from exc
