"""The served model: a checkpoint loaded once, its forward pass and its description."""

import hashlib
from pathlib import Path

import torch

import eanet.accel
from eanet import __version__, checkpoint
from eanet.inference import compiled_forward
from eanet.models.registry import count_parameters
from eanet.runtime import autocast, resolve_device, resolve_precision


class ServedModel:
    """A checkpoint loaded for serving: model, class names, name and version, forward pass."""

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        precision: str = "fp32",
        compile: bool = False,
        accel: bool = True,
    ) -> None:
        path = checkpoint.resolve(path)
        self.path = path
        self.model, ckpt = checkpoint.load_model(path, resolve_device(device))
        self.meta = ckpt.meta
        self.class_names = ckpt.class_names
        self.config = self.model.config
        self.device = next(self.model.parameters()).device
        self.precision = resolve_precision(precision, self.device)  # the forward pass's
        self.accel = eanet.accel.apply(self.model, self.device, self.precision) if accel else None
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        fallback = "eanet" if self.config.attention == "external" else "vit"
        self.name = str(self.meta.model_name or fallback)
        self.parameters = count_parameters(self.model)
        self.compiled = compile
        self.runner = compiled_forward(self.model) if compile else self.model
        if compile:  # batches of 1 then 2: torch then compiles one graph for every size
            for n in (1, 2):
                self.forward(torch.zeros(n, 3, self.image_size, self.image_size, dtype=torch.uint8))

    @property
    def image_size(self) -> int:
        return self.config.image_size

    def describe(self) -> dict:
        """Name and version, as every /predict response carries them."""
        return {
            "name": self.name,
            "version": f"sha256:{self.sha256[:12]}",
            "checkpoint_sha256": self.sha256,
            "eanet_version": __version__,
            "trained_with_eanet": self.meta.eanet_version,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 images [B, 3, S, S] -> float logits [B, classes] on the CPU."""
        with torch.inference_mode(), autocast(self.precision, self.device):
            return self.runner(x.to(self.device)).float().cpu()
