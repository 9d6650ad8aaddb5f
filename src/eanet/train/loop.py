"""Training: the Keras example's recipe (AdamW, label smoothing, last-20% validation) in one loop.

Data stay uint8 tensors on the training device; each batch is a `randperm` slice,
augmented on the device in pixel space and only then normalised (inside the model): the
fix of the reference's bug. Every epoch writes an atomic checkpoint with optimizer and RNG
state, so `resume` continues bit-for-bit where an interrupted run stopped.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from eanet import __version__, checkpoint
from eanet.data.dataset import ImageData
from eanet.data.load import load_dataset
from eanet.data.splits import compute_normalization, train_val_split
from eanet.errors import ConfigError, EANetError
from eanet.fileio import write_json
from eanet.inference import evaluate_tensors
from eanet.metrics import Metrics
from eanet.models.registry import build_model, model_config
from eanet.models.transformer import VisionTransformer
from eanet.runtime import environment, set_threads, tune_cpu_allocator
from eanet.train import distributed, finetune
from eanet.train.config import TrainConfig
from eanet.train.guard import StepGuard, graceful_interrupts
from eanet.train.provenance import configure_determinism, provenance
from eanet.train.rundir import prepare_run_dir, write_history
from eanet.train.step import accelerate, make_optimizer, train_epoch

log = logging.getLogger(__name__)


def _fmt(prefix: str, m: Metrics) -> str:
    return f"{prefix} loss {m.loss:.4f} top1 {m.top1:.2%} top5 {m.top5:.2%}"


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


@graceful_interrupts  # Ctrl-C/SIGTERM: stop between steps, keep the last epoch
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
    configure_determinism(cfg.deterministic)  # before CUDA starts
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
                "reproducibility": provenance(cfg, device),
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
    guard = StepGuard(cfg.on_nonfinite, cfg.lr, out)
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
