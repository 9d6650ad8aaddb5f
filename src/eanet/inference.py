"""Batched forward passes without gradients: logits of many images, and their metrics."""

from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm.auto import tqdm

from eanet.metrics import Metrics, metrics_from_logits
from eanet.models.transformer import VisionTransformer
from eanet.runtime import autocast, resolve_precision

log = logging.getLogger(__name__)


def compiled_forward(model: VisionTransformer) -> nn.Module:
    """torch.compile of `model` for forward passes without gradients (`--compile`).

    Its attributes (config, parameters, eval) are the model's. The first batch of each new
    size compiles (tens of seconds); after a second size torch compiles one graph for any
    batch size. What it gains per CPU class: docs/speed.md.
    """
    log.info("compiling the forward pass with torch.compile (the first batches are slow)")
    return torch.compile(model)


@torch.no_grad()
def predict_logits(
    model: VisionTransformer,
    images: torch.Tensor,
    batch_size: int = 500,
    progress: bool = False,
    desc: str = "predict",
    precision: str = "fp32",
) -> torch.Tensor:
    """Logits (fp32) for uint8 images [N, C, H, W], in batches, on the model's device (eval).

    `precision` ('fp32', 'bf16' or 'auto') is the forward pass's (`eanet.runtime.autocast`).
    """
    device = next(model.parameters()).device
    precision = resolve_precision(precision, device)
    was_training = model.training
    model.eval()
    out = []
    for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        with autocast(precision, device):
            out.append(model(images[i : i + batch_size].to(device, non_blocking=True)).float())
    model.train(was_training)
    if not out:
        return torch.empty(0, model.config.num_classes, device=device)
    return torch.cat(out)


@torch.no_grad()
def evaluate_tensors(
    model: VisionTransformer,
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 500,
    label_smoothing: float = 0.1,
    progress: bool = False,
    desc: str = "evaluate",
    precision: str = "fp32",
) -> Metrics:
    """Metrics of `model` on uint8 images and int64 labels (the loss as in training)."""
    logits = predict_logits(model, images, batch_size, progress, desc, precision)
    return metrics_from_logits(logits, labels, label_smoothing)
