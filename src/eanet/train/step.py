"""One training step and one epoch: augment, forward, loss, backward, AdamW."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from eanet.data.augment import AugmentConfig
from eanet.metrics import Metrics, MetricSums
from eanet.models.transformer import VisionTransformer
from eanet.runtime import autocast, resolve_precision
from eanet.train import distributed
from eanet.train import guard as guard_mod
from eanet.train.augmentation import BatchAugment
from eanet.train.config import REFERENCE_BATCH, TrainConfig
from eanet.train.ema import EMA
from eanet.train.optim import KerasAdamW
from eanet.train.schedule import LRSchedule

log = logging.getLogger(__name__)


@dataclass
class StepExtras:
    """What a step does beyond the reference's: lr schedule, gradient clipping, EMA, logging.

    `step` is the optimizer step of the batch being trained (0-based over the whole run);
    `epoch_offset` the first step of the current epoch, set by the training loop.
    """

    schedule: LRSchedule | None = None
    grad_clip: float = 0.0
    ema: EMA | None = None
    ema_source: nn.Module | None = None  # the (unwrapped) model the EMA averages
    logger: object | None = None  # train.tblog.TensorBoardLog
    epoch_offset: int = 0
    step: int = 0

    def before_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Set this step's learning rate and clip the gradients."""
        if self.schedule is not None:
            lr = self.schedule(self.step)
            for group in optimizer.param_groups:
                group["lr"] = lr
        if self.grad_clip > 0:
            params = [p for g in optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)

    def after_step(self, optimizer: torch.optim.Optimizer, loss: torch.Tensor, n: int) -> None:
        """Fold the new weights into the EMA; log the step."""
        if self.ema is not None:
            self.ema.update(self.ema_source)
        if self.logger is not None:
            self.logger.log_step(self.step, loss, optimizer.param_groups[0]["lr"], n)


def accelerate(model: VisionTransformer, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """The module the training steps call: the model, or torch.compile of it (--compile).

    With --precision bf16 on CUDA, fp32 matmuls outside autocast may use TF32 too.
    """
    if resolve_precision(cfg.precision, device) == "bf16" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if not cfg.compile:
        return model
    log.info(
        "compiling the model with torch.compile, mode %s (the first steps are slow)",
        cfg.compile_mode,
    )
    return torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)


def scaled_lr(cfg: TrainConfig) -> float:
    """AdamW's learning rate: --lr, times batch/128 under --lr-scaling linear."""
    if cfg.lr_scaling == "linear":
        return cfg.lr * cfg.batch_size / REFERENCE_BATCH
    return cfg.lr


def make_optimizer(model: VisionTransformer, cfg: TrainConfig) -> torch.optim.AdamW:
    """The reference's AdamW: decoupled decay on every trainable tensor, Keras's epsilon.

    --adam-eps-rule keras (the default) places epsilon as Keras does (`train.optim`);
    torch: torch.optim.AdamW's own rule. --weight-decay-params matrices: two groups, decay on
    weight matrices only. On CUDA torch's fused kernel (one launch for every tensor);
    elsewhere torch's default implementation.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    kernel = {"fused": True} if params and all(p.is_cuda for p in params) else {}
    if cfg.weight_decay_params == "matrices":
        params = decay_groups(model, cfg.weight_decay)
    if cfg.lr_scaling != "none":
        log.info("learning rate %g (%s scaling of --lr %g)", scaled_lr(cfg), cfg.lr_scaling, cfg.lr)
    adamw = KerasAdamW if cfg.adam_eps_rule == "keras" else torch.optim.AdamW
    optimizer = adamw(
        params,
        lr=scaled_lr(cfg),
        betas=(0.9, 0.999),
        eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay,
        **kernel,
    )
    optimizer.register_load_state_dict_post_hook(_own_kernel)
    return optimizer


def _own_kernel(optimizer: torch.optim.Optimizer) -> None:
    """After loading a checkpoint: this device's AdamW kernel, not the one that saved it.

    `load_state_dict` takes every group setting from the file, `fused` too, so a CPU
    checkpoint resumed on a GPU would lose the fused kernel and a GPU one would bring it to
    the CPU. The fused kernel keeps its step counts on the parameters' device.
    """
    for group in optimizer.param_groups:
        group["fused"] = optimizer.defaults["fused"]
        group["foreach"] = optimizer.defaults["foreach"]
        if not group["fused"]:
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if "step" in state:
                state["step"] = state["step"].to(p.device, torch.float32)


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight matrices decayed; biases, LayerNorm, position embedding not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        is_matrix = p.ndim >= 2 and not name.endswith("pos_embed")
        (decay if is_matrix else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def train_step(
    model: VisionTransformer,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    aug: AugmentConfig,
    loss_scale: float = 1.0,
    guard: guard_mod.StepGuard | None = None,
    extras: StepExtras | None = None,
    batch_augment: BatchAugment | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment, forward, label-smoothed loss, backward, AdamW step; returns (logits, loss).

    `loss_scale` weights the gradient (not the returned loss): a rank's share of a short
    last batch under DDP (see `distributed.Distributed.shard`). `guard` may veto the
    optimizer step of a non-finite batch: then `guard_mod.BatchSkipped` is raised.
    `extras`: the schedule, clipping, EMA and logging of the modern recipe's options.
    `batch_augment`: the augmentation of `cfg` and `aug`, decided once by the caller
    (`BatchAugment.from_config`); without it, decided here for this step.
    """
    if batch_augment is None:
        batch_augment = BatchAugment.from_config(cfg, aug)
    with autocast(resolve_precision(cfg.precision, x.device), x.device):
        logits, target = batch_augment(model, x, y)
        loss = F.cross_entropy(logits.float(), target, label_smoothing=cfg.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    (loss if loss_scale == 1.0 else loss * loss_scale).backward()
    if guard is not None and not guard.allow_step(loss, optimizer):
        optimizer.zero_grad(set_to_none=True)
        raise guard_mod.BatchSkipped
    if extras is not None:
        extras.before_step(optimizer)
    optimizer.step()
    if extras is not None:
        extras.after_step(optimizer, loss, len(x))
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
    guard: guard_mod.StepGuard | None = None,
    extras: StepExtras | None = None,
    batch_augment: BatchAugment | None = None,
) -> Metrics:
    """One pass over the training tensors in a fresh random order, last batch partial.

    With `dist` (inside its `epoch_rng`), the order is the one every rank shares and
    this process trains on its share of each global batch; the metrics are its own.
    With `guard`, a signal stops training between steps and a non-finite loss stops it
    or skips the batch (`guard_mod.StepGuard`); skipped batches are not in the metrics.
    With `extras`, its `step` follows the batches from its `epoch_offset`.
    `batch_augment`: the run's augmentation (default: `cfg`'s), decided once, not per batch.
    """
    model.train()
    aug = AugmentConfig()
    if batch_augment is None:
        batch_augment = BatchAugment.from_config(cfg, aug)
    sums = MetricSums(images.device)
    live = live_metrics(images.device)
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
        if extras is not None:
            extras.step = extras.epoch_offset + step
        try:
            logits, loss = train_step(
                model, optimizer, x, y, cfg, aug, scale, guard, extras, batch_augment
            )
        except guard_mod.BatchSkipped:
            continue
        if scale:  # weight 0: a stand-in image, only there to join the gradient average
            sums.add(logits, y, loss)
        if progress and (step % 10 == 0 or step == steps - 1):
            _show(bar, sums, live or step == steps - 1)
    if guard is not None:
        guard.end_epoch(model)
    return sums.result()


def live_metrics(device: torch.device) -> bool:
    """Whether the progress bar may read the running metrics during an epoch.

    Not on CUDA: each read waits for the GPU to drain its queue, every 10 steps. There the
    bar shows steps and images/s during the epoch and the metrics once, at its end.
    """
    return device.type != "cuda"


def _show(bar: tqdm, sums: MetricSums, read: bool) -> None:
    """The bar's postfix: images/s, and the running metrics where `read` (a host sync).

    Without a read on CUDA the rate counts the images queued, which the GPU may still be
    working on; the last update of an epoch reads, so its rate is the real one.
    """
    rate = sums.count / max(bar.format_dict["elapsed"], 1e-9)  # count is a host int
    if not read:
        bar.set_postfix(img_s=f"{rate:.0f}")
        return
    m = sums.result()
    bar.set_postfix(
        loss=f"{m.loss:.3f}", top1=f"{m.top1:.1%}", top5=f"{m.top5:.1%}", img_s=f"{rate:.0f}"
    )
