"""Training: the Keras example's recipe (AdamW, label smoothing, last-20% validation) in one loop.

Data stay uint8 tensors on the training device; each batch is a `randperm` slice,
augmented on the device in pixel space and only then normalised (inside the model): the
fix of the reference's bug. Every epoch writes an atomic checkpoint with optimizer and RNG
state, so `resume` continues bit-for-bit where an interrupted run stopped.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from eanet import __version__, accel, checkpoint
from eanet.data.dataset import ImageData
from eanet.data.load import load_dataset
from eanet.data.splits import compute_normalization, train_val_split
from eanet.errors import ConfigError, EANetError
from eanet.fileio import atomic_path, write_json
from eanet.inference import Runtime, evaluate_tensors
from eanet.metrics import Metrics
from eanet.models.registry import MODELS, build_model, model_config
from eanet.models.transformer import VisionTransformer
from eanet.runtime import environment, set_threads, tune_cpu_allocator
from eanet.train import distributed, finetune
from eanet.train.augmentation import BatchAugment
from eanet.train.config import TrainConfig
from eanet.train.ema import EMA
from eanet.train.guard import StepGuard, graceful_interrupts
from eanet.train.provenance import configure_determinism, provenance
from eanet.train.rundir import claim_run_dir, write_history, write_run_config
from eanet.train.schedule import LRSchedule
from eanet.train.step import StepExtras, accelerate, make_optimizer, scaled_lr, train_epoch
from eanet.train.tblog import TensorBoardLog, check_tensorboard

log = logging.getLogger(__name__)


def _fmt(prefix: str, m: Metrics) -> str:
    return f"{prefix} loss {m.loss:.4f} top1 {m.top1:.2%} top5 {m.top5:.2%}"


def load_data(cfg: TrainConfig, progress: bool = True) -> ImageData:
    """The data set a training config names, shaped for its model (fashion-mnist's channels)."""
    return load_dataset(
        cfg.dataset,
        cfg.data_path,
        md5=cfg.md5,
        verify=cfg.verify,
        progress=progress,
        image_size=cfg.image_size,
        synthetic_images=cfg.synthetic_images,
        channels=_model_channels(cfg),
    )


def _model_channels(cfg: TrainConfig) -> int:
    """The input channels the named model asks for (its registered config or --model-arg)."""
    return int(cfg.model_args.get("in_chans", MODELS[cfg.model].config.in_chans))


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


@dataclass(frozen=True)
class _Run:
    """Everything one training run holds, built complete by `_build_run`.

    No field is set after that; only `history` changes, a row appended per epoch
    (`_save_epoch`). What the fields hold changes its own state as training goes: the
    weights, AdamW, the EMA's averages and `extras`' step counters. A None means that
    part is off for the whole run.
    """

    cfg: TrainConfig
    out: Path
    dist: distributed.Distributed
    data: ImageData
    progress: bool
    runtime: Runtime  # device (this rank's), resolved precision, accel, compile
    accel: accel.AccelReport | None  # what eanet.accel swapped in (None: --no-accel)
    model: VisionTransformer
    optimizer: torch.optim.Optimizer
    batch_augment: BatchAugment  # the augmentation of every training batch
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    extras: StepExtras | None  # schedule, clipping, EMA, logging (None: the reference's)
    ema_model: VisionTransformer | None  # holds the EMA weights for evaluation
    logger: TensorBoardLog | None  # --log tensorboard, on rank 0
    start: int  # the first epoch still to train (after a resumed checkpoint's)
    history: list[dict]  # a row per epoch trained, the resumed checkpoint's first

    @property
    def steps_per_epoch(self) -> int:
        return _steps_per_epoch(self.cfg, self.train_x)

    @property
    def title(self) -> str:
        return f"{self.cfg.model} on {self.data.name}"


def _steps_per_epoch(cfg: TrainConfig, train_x: torch.Tensor) -> int:
    return math.ceil(len(train_x) / cfg.batch_size)


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
    train one model with DDP; `eanet.train.distributed` says what is global and what per
    rank. The phases: start the session, build the run (or restore it), record its
    configuration, train epoch by epoch (each saved), then test.
    """
    out = Path(out)
    cfg.validate()
    cfg.check_model()
    if cfg.log == "tensorboard":
        check_tensorboard()  # before the run directory is touched
    with contextlib.ExitStack() as held:  # the run directory's lock, the logger
        dist = _start_session(cfg, out, resume, overwrite, held)
        progress = progress and dist.is_main
        if data is None:
            with dist.local_main_first():  # one download per node
                data = load_data(cfg, progress)
        run = _build_run(cfg, out, dist, data, resume, progress, held)
        if dist.is_main:
            if resume:
                _rewrite_resumed_files(run)  # in case the kill came before they were written
            write_run_config(out, cfg, _run_record(run))
            _log_augmented_images(run)
        runner = accelerate(dist.wrap(run.model), cfg, dist.device)  # DDP under torchrun
        guard = StepGuard(cfg.on_nonfinite, cfg.lr, out)
        for epoch in range(run.start, cfg.epochs + 1):
            row = _train_and_validate(run, runner, guard, epoch)
            _save_epoch(run, row)
            guard.epoch_saved()  # a Ctrl-C during validation or saving stops here
        metrics = _test(run)
        # DDP's reducer must not hold the group's last reference: freed after the group is
        # destroyed, it joins gloo's threads holding the GIL while one of them waits for the
        # GIL to free a finished collective's tensors (a hang seen here; pytorch#56297).
        del runner
    dist.close()
    return metrics


def _start_session(
    cfg: TrainConfig, out: Path, resume: bool, overwrite: bool, held: contextlib.ExitStack
) -> distributed.Distributed:
    """Determinism, the process group (under torchrun), the run directory, threads, seed."""
    configure_determinism(cfg.deterministic)  # before CUDA starts
    dist = distributed.setup(cfg.device)  # a process group only under torchrun
    dist.check_batch(cfg.batch_size)
    # Only rank 0 touches `out`: it locks it for the run, then cleans and checks it.
    dist.from_main(claim_run_dir, held, out, resume, overwrite)
    set_threads(cfg.threads)
    tune_cpu_allocator()
    torch.manual_seed(cfg.seed)
    return dist


def _build_run(
    cfg: TrainConfig,
    out: Path,
    dist: distributed.Distributed,
    data: ImageData,
    resume: bool,
    progress: bool,
    held: contextlib.ExitStack,
) -> _Run:
    """The run, each part computed once: the model (fine-tuned, fresh or resumed), its
    optimizer and EMA, the split tensors on the device, the step extras, the logger."""
    rt = Runtime.resolve(dist.device, cfg.precision, cfg.accel, cfg.compile, cfg.compile_mode)
    model = _build_model(cfg, data, rt, resume)
    report = rt.place(model)  # the training step is compiled by `accelerate`, in `fit`
    if report is not None:
        log.info("accel: %s", report.summary())
    optimizer = make_optimizer(model, cfg)
    train_x, train_y, val_x, val_y = (
        t.to(rt.device) for t in train_val_split(data, cfg.val_fraction)
    )
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay else None
    ema_model = None if ema is None else copy.deepcopy(model).eval()
    history, start = [], 1
    if resume:
        history, start = _restore(cfg, out, dist, data, model, optimizer, ema)
    logger = _open_logger(cfg, out, held) if dist.is_main else None
    steps = _steps_per_epoch(cfg, train_x)
    return _Run(
        cfg=cfg,
        out=out,
        dist=dist,
        data=data,
        progress=progress,
        runtime=rt,
        accel=report,
        model=model,
        optimizer=optimizer,
        batch_augment=BatchAugment.from_config(cfg),
        train_x=train_x,
        train_y=train_y,
        val_x=val_x,
        val_y=val_y,
        extras=_step_extras(cfg, model, steps, ema, logger),
        ema_model=ema_model,
        logger=logger,
        start=start,
        history=history,
    )


def _build_model(cfg: TrainConfig, data: ImageData, rt: Runtime, resume: bool) -> VisionTransformer:
    """The model on the run's device: fresh, or fine-tuned from --init-from, maybe frozen."""
    model = build_for_data(cfg, data).to(rt.device)
    if cfg.init_from and not resume:  # a resumed run has its own weights
        finetune.load_compatible(model, cfg.init_from, data.class_names)
    if cfg.freeze_backbone:
        finetune.freeze_backbone(model)
    return model


def _step_extras(
    cfg: TrainConfig,
    model: VisionTransformer,
    steps_per_epoch: int,
    ema: EMA | None,
    logger: TensorBoardLog | None,
) -> StepExtras | None:
    """The step extras the options ask for (None for the reference recipe)."""
    if cfg.lr_schedule == "constant" and not (cfg.grad_clip or cfg.ema_decay) and cfg.log == "none":
        return None
    schedule = None
    if cfg.lr_schedule != "constant":
        total = cfg.epochs * steps_per_epoch  # a new --epochs on resume: the new length
        schedule = LRSchedule(
            cfg.lr_schedule, scaled_lr(cfg), total, cfg.warmup_fraction, cfg.warmup_lr, cfg.min_lr
        )
    return StepExtras(schedule, cfg.grad_clip, ema, model, logger)


def _open_logger(cfg: TrainConfig, out: Path, held: contextlib.ExitStack) -> TensorBoardLog | None:
    """--log tensorboard: the writer, closed when `held` is (None without the option)."""
    if cfg.log != "tensorboard":
        return None
    logger = TensorBoardLog(out)
    held.callback(logger.close)
    return logger


def _log_augmented_images(run: _Run) -> None:
    """Once, on a fresh run with a logger: a grid of augmented training images."""
    if run.logger is None or run.start != 1 or not run.batch_augment.in_pixel_space:
        return
    device = run.dist.device
    # A forked RNG: the grid's draws do not shift the training run's random numbers.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        images = run.batch_augment.pixels(run.train_x[:32])
    run.logger.log_images(images)


def _restore(
    cfg: TrainConfig,
    out: Path,
    dist: distributed.Distributed,
    data: ImageData,
    model: VisionTransformer,
    optimizer: torch.optim.Optimizer,
    ema: EMA | None,
) -> tuple[list[dict], int]:
    """Weights, AdamW, EMA and RNG state of the run's last complete epoch; returns its
    history and the first epoch still to train."""
    ckpt = dist.from_main(checkpoint.load, out)  # every rank restores rank 0's file
    if ckpt.class_names != data.class_names:
        raise EANetError(
            f"{out}: the checkpoint was trained on other classes than "
            f"{data.name}; resume it with its own data set"
        )
    checkpoint.restore_training(model, optimizer, ckpt, out)
    if ema is not None:
        try:
            ema.load(ckpt.extra)
        except (KeyError, RuntimeError) as exc:
            raise checkpoint.CheckpointError(
                f"{out}: the checkpoint holds no moving average of the weights to resume "
                "--ema-decay with; it is damaged or from another recipe"
            ) from exc
    log.info("resuming %s after epoch %d of %d", out, ckpt.meta.epoch, cfg.epochs)
    return ckpt.meta.history, ckpt.meta.epoch + 1


def _rewrite_resumed_files(run: _Run) -> None:
    """best.safetensors and the history files of a resumed run, which a kill may have beaten."""
    if _best_epoch(run.history) == run.start - 1:
        _keep_best(run)  # in case the kill came between the checkpoint and its copy
    write_history(run.out, run.history, run.title, run.data.num_classes)


def _run_record(run: _Run) -> dict:
    """config.json beyond the options: model, data set sizes, versions, machine."""
    return {
        "model": run.model.config.to_dict(),
        "dataset": {
            "name": run.data.name,
            "classes": run.data.num_classes,
            "train_images": len(run.train_x),
            "val_images": len(run.val_x),
            "test_images": len(run.data.test_images),
        },
        "eanet_version": __version__,
        "precision": run.runtime.precision,  # 'auto' resolved
        "accel": None if run.accel is None else run.accel.to_dict(),
        "environment": environment(),
        "distributed": run.dist.describe(),
        "reproducibility": provenance(run.cfg, run.dist.device),
    }


def _train_and_validate(run: _Run, runner: torch.nn.Module, guard: StepGuard, epoch: int) -> dict:
    """One epoch of training and validation; its history row (figures over all ranks)."""
    cfg, dist = run.cfg, run.dist
    t0 = time.perf_counter()
    if run.extras is not None:
        run.extras.epoch_offset = (epoch - 1) * run.steps_per_epoch
    with dist.epoch_rng(cfg.seed, epoch):
        tr = train_epoch(
            runner,
            run.optimizer,
            run.train_x,
            run.train_y,
            cfg,
            desc=f"epoch {epoch}/{cfg.epochs}",
            progress=run.progress,
            dist=dist if dist.enabled else None,
            guard=guard,
            extras=run.extras,
            batch_augment=run.batch_augment,
        )
    tr = dist.all_reduce(tr)  # every rank logs the figures over all ranks' images
    train_s = time.perf_counter() - t0
    va = evaluate_tensors(
        run.model,
        *dist.eval_shard(run.val_x, run.val_y),
        cfg.eval_batch_size,
        cfg.label_smoothing,
        precision=run.runtime.precision,
    )
    va = dist.all_reduce(va)
    row = _history_row(epoch, tr, va, train_s, time.perf_counter() - t0)
    if cfg.on_nonfinite == "skip":
        row["skipped_batches"] = guard.skipped  # batches with a NaN/inf loss, not stepped
    _extra_figures(run, row)
    log.info(
        "epoch %d/%d  %s | %s | %.1fs %.0f img/s",
        epoch,
        cfg.epochs,
        _fmt("train", tr),
        _fmt("val", va) if va.count else "no validation",
        row["epoch_seconds"],
        row["train_images_per_s"],
    )
    return row


def _evaluate(run: _Run, model: VisionTransformer, x: torch.Tensor, y: torch.Tensor, **kw):
    """`model`'s figures on (x, y), sharded over the ranks and summed."""
    cfg, dist = run.cfg, run.dist
    m = evaluate_tensors(
        model,
        *dist.eval_shard(x, y),
        cfg.eval_batch_size,
        cfg.label_smoothing,
        precision=run.runtime.precision,
        **kw,
    )
    return dist.all_reduce(m)


def _extra_figures(run: _Run, row: dict) -> None:
    """The row's learning rate (with a schedule) and the EMA weights' validation figures."""
    if run.cfg.lr_schedule != "constant":
        row["lr"] = run.optimizer.param_groups[0]["lr"]  # of the epoch's last step
    if run.ema_model is not None and len(run.val_x):
        va = _evaluate(run, run.extras.ema.copy_to(run.ema_model), run.val_x, run.val_y)
        row.update(ema_val_loss=va.loss, ema_val_top1=va.top1, ema_val_top5=va.top5)
    if run.logger is not None:
        run.logger.log_epoch(row)


def _history_row(epoch: int, tr: Metrics, va: Metrics, train_s: float, epoch_s: float) -> dict:
    return {
        "epoch": epoch,
        "train_loss": tr.loss,
        "train_top1": tr.top1,
        "train_top5": tr.top5,
        "val_loss": va.loss if va.count else None,
        "val_top1": va.top1 if va.count else None,
        "val_top5": va.top5 if va.count else None,
        "train_seconds": round(train_s, 3),
        "epoch_seconds": round(epoch_s, 3),
        "train_images_per_s": round(tr.count / train_s, 2),
    }


def _save_epoch(run: _Run, row: dict) -> None:
    """Append the row and, on rank 0, write the checkpoint and the history files."""
    run.history.append(row)
    if not run.dist.is_main:
        return
    meta = checkpoint.CheckpointMeta(
        class_names=run.data.class_names,
        model_name=run.cfg.model,
        train_config=run.cfg.to_dict(),
        eanet_version=__version__,
        epoch=row["epoch"],
        history=run.history,
    )
    ema = run.extras.ema if run.extras is not None else None
    extra = ema.tensors() if ema is not None else None
    path = run.out / checkpoint.CHECKPOINT_NAME
    checkpoint.save(path, run.model, meta, run.optimizer, rng=True, extra=extra)
    _keep_best(run)
    write_history(run.out, run.history, run.title, run.data.num_classes)


def _best_epoch(history: list[dict]) -> int | None:
    """The first epoch with the highest validation top-1 (None without validation)."""
    rows = [h for h in history if h.get("val_top1") is not None]
    return max(rows, key=lambda h: h["val_top1"])["epoch"] if rows else None


def _keep_best(run: _Run) -> None:
    """best.safetensors = a copy of the checkpoint of the best validation epoch so far.

    A copy of the file just saved, so it is the checkpoint of that epoch exactly (its
    `epoch` is the best epoch); `_restore` re-copies it if a kill came between the two.
    """
    best = run.out / checkpoint.BEST_NAME
    if _best_epoch(run.history) == run.history[-1]["epoch"]:
        with atomic_path(best) as tmp:
            shutil.copyfile(run.out / checkpoint.CHECKPOINT_NAME, tmp)


def _test(run: _Run) -> dict:
    """The final weights' test figures (as the reference reports them), in metrics.json."""
    cfg, dist, data = run.cfg, run.dist, run.data
    test = evaluate_tensors(
        run.model,
        *dist.eval_shard(data.test_images.to(dist.device), data.test_labels.to(dist.device)),
        cfg.eval_batch_size,
        cfg.label_smoothing,
        progress=run.progress,
        desc="test",
        precision=run.runtime.precision,
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
    vals = [h["val_top1"] for h in run.history if h["val_top1"] is not None]
    if vals:
        metrics["best_val_top1"] = max(vals)
        metrics["final_val_top1"] = vals[-1]
    log.info("%s (last weights, epoch %d; %d images)", _fmt("test", test), cfg.epochs, test.count)
    metrics.update(_test_other_weights(run, bool(vals)))
    if dist.is_main:
        write_json(run.out / "metrics.json", metrics)
    return metrics


def _test_other_weights(run: _Run, has_best: bool) -> dict:
    """Test figures of the best-validation weights (best.safetensors) and of the EMA."""
    data, device, out = run.data, run.dist.device, {}
    x, y = data.test_images.to(device), data.test_labels.to(device)
    models = {}
    if has_best:
        ckpt = run.dist.from_main(checkpoint.load, run.out / checkpoint.BEST_NAME)
        best = copy.deepcopy(run.model)
        checkpoint.load_weights(best, ckpt, run.out / checkpoint.BEST_NAME)
        out["best_epoch"] = ckpt.meta.epoch
        models["best"] = best
    if run.ema_model is not None:
        models["ema"] = run.extras.ema.copy_to(run.ema_model)
    for name, model in models.items():
        m = _evaluate(run, model, x, y)
        out.update({f"{name}_test_loss": m.loss, f"{name}_test_top1": m.top1})
        out[f"{name}_test_top5"] = m.top5
        which = f"best weights, epoch {out['best_epoch']}" if name == "best" else "EMA weights"
        log.info("%s (%s)", _fmt("test", m), which)
    return out
