"""Where and how a model runs (`Runtime`, resolved once), and batched forward passes without
gradients: logits of many images, and their metrics."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

import eanet.accel
from eanet.errors import ConfigError
from eanet.metrics import Metrics, metrics_from_logits
from eanet.models.transformer import VisionTransformer
from eanet.runtime import autocast, resolve_device, resolve_precision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """A model made ready by `Runtime.prepare`: what to call, the model, what accel did."""

    runner: nn.Module  # the model, or torch.compile of it (--compile)
    model: VisionTransformer  # on the device; its layers swapped in place under accel
    accel: eanet.accel.AccelReport | None  # None: the plain model (--no-accel)


@dataclass(frozen=True)
class Runtime:
    """Where and how the model runs, resolved once and used by train, evaluate, predict,
    serve, bench and `eanet.load`: device, precision, eanet.accel, torch.compile."""

    device: torch.device
    precision: str  # resolved: 'fp32' or 'bf16' ('auto' chose one)
    accel: bool = True  # eanet.accel's faster layers; False: the plain model's torch ops
    compile: bool = False  # torch.compile: the forward pass here, the step in training
    compile_mode: str = "default"  # torch.compile's mode

    @classmethod
    def resolve(
        cls,
        device: str | torch.device = "auto",
        precision: str = "fp32",
        accel: bool = True,
        compile: bool = False,
        compile_mode: str = "default",
    ) -> Runtime:
        """The options as given, 'auto' device and precision resolved (with their one-line
        ConfigErrors: no GPU for cuda, an unknown precision; one warning for emulated bf16)."""
        if compile_mode != "default" and not compile:
            raise ConfigError(
                f"--compile-mode {compile_mode} applies to torch.compile; add --compile"
            )
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        return cls(dev, resolve_precision(precision, dev), accel, compile, compile_mode)

    def to_dict(self) -> dict:
        """JSON-ready, for records: the device as a string."""
        return {**dataclasses.asdict(self), "device": str(self.device)}

    def place(self, model: VisionTransformer) -> eanet.accel.AccelReport | None:
        """Move `model` to the device and, with accel, swap in its faster layers (in place);
        what `eanet.accel.apply` did, or None. Training compiles its step itself."""
        model.to(self.device)
        return eanet.accel.apply(model, self.device, self.precision) if self.accel else None

    def prepare(self, model: VisionTransformer) -> Prepared:
        """`model` ready for forward passes without gradients: placed, and its forward pass
        compiled under compile."""
        report = self.place(model)
        runner = compiled_forward(model, self.compile_mode) if self.compile else model
        return Prepared(runner, model, report)


def compiled_forward(model: VisionTransformer, mode: str = "default") -> nn.Module:
    """torch.compile of `model` for forward passes without gradients (`--compile`).

    Its attributes (config, parameters, eval) are the model's. The first batch of each new
    size compiles (tens of seconds); after a second size torch compiles one graph for any
    batch size. What it gains per CPU class: docs/speed.md.
    """
    log.info("compiling the forward pass with torch.compile (the first batches are slow)")
    return torch.compile(model, mode=None if mode == "default" else mode)


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
