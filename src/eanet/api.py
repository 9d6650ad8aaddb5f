"""The Python API: `eanet.load(path)` -> a `Classifier` that predicts class names.

    import eanet
    clf = eanet.load("runs/demo")
    clf.predict("photo.jpg", top_k=3).label          # one image: one Prediction
    [p.label for p in clf.predict(["a.png", "b.png"])]  # a list: a list

Inputs go through `eanet.images`, the same preprocessing as `eanet predict` and folder
training.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from eanet import checkpoint
from eanet.data.images import ImageLike
from eanet.errors import DataError
from eanet.inference import Runtime
from eanet.models.config import ModelConfig
from eanet.models.transformer import VisionTransformer
from eanet.predict import Prediction, predict_batch

if TYPE_CHECKING:  # loaded when `attention` is called
    from eanet.attention_maps import AttentionMaps


class Classifier:
    """A trained model with its class names, ready to predict images."""

    def __init__(
        self,
        model: VisionTransformer,
        class_names: Sequence[str],
        meta: dict | None = None,
        precision: str = "fp32",
    ) -> None:
        if len(class_names) != model.config.num_classes:
            raise ValueError(
                f"{len(class_names)} class names for a model with {model.config.num_classes} "
                "outputs"
            )
        self.model = model.eval()
        self.class_names = list(class_names)
        self.meta = meta or {}
        self.precision = precision  # of every forward pass: fp32, bf16 or auto

    @property
    def config(self) -> ModelConfig:
        """The model's architecture (ModelConfig)."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where the model's weights are."""
        return next(self.model.parameters()).device

    @property
    def image_size(self) -> int:
        """The side every image is resized to."""
        return self.model.config.image_size

    def predict(
        self, images: ImageLike | Sequence[ImageLike], top_k: int = 5, batch_size: int = 64
    ) -> Prediction | list[Prediction]:
        """Top-k classes, best first: one image gives one Prediction, a list (or batch) a list.

        An image: a file path, encoded bytes, a PIL image, a numpy array HWC (uint8 or
        float, pixel values 0..255) or a tensor CHW. Many: a list of those, a 4-d numpy
        array (NHWC) or a 4-d tensor (NCHW). Any size: resized like everything else.
        """
        batch, many = _as_list(images)
        got = predict_batch(self.model, self.class_names, batch, top_k, batch_size, self.precision)
        return got if many else got[0]

    def attention(self, images: ImageLike | Sequence[ImageLike]) -> list[AttentionMaps]:
        """Each image's attention maps, in float32: EANet's memory units over the patches per
        block, or ViT's attention rollout; `.save(dir, name)` writes the PNG and tensors.

        `images`: as `predict` takes them.
        """
        from eanet.attention_maps import attention_maps

        return attention_maps(self.model, self.class_names, _as_list(images)[0])

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Classifier({c.attention} attention, {c.image_size}x{c.image_size}, "
            f"{len(self.class_names)} classes, device={self.device})"
        )


def _as_list(images: ImageLike | Sequence[ImageLike]) -> tuple[list[ImageLike], bool]:
    """(the single images, whether several were given: a list or a 4-d batch)."""
    if isinstance(images, (torch.Tensor, np.ndarray)):
        return (list(images), True) if images.ndim == 4 else ([images], False)
    if isinstance(images, (str, Path, bytes, bytearray)) or not isinstance(images, Sequence):
        return [images], False
    if not images:
        raise DataError("no images given to predict")
    return list(images), True


def load(
    path: str | Path,
    device: str = "auto",
    precision: str = "fp32",
    compile: bool = False,
    accel: bool = True,
) -> Classifier:
    """A Classifier from a checkpoint file or run directory (on cuda when available).

    `precision`: 'fp32' (default), 'bf16' or 'auto' (bf16 where the device runs it natively).
    `compile`: predict through torch.compile (the first batches of a new size are slow).
    `accel`: the faster equivalents of the model's layers (`eanet.accel.apply`); False: the
    plain model's torch ops.
    """
    rt = Runtime.resolve(device, precision, accel, compile)  # fails here, not at predict
    model, ckpt = checkpoint.load_model(path, rt.device)
    ready = rt.prepare(model)
    return Classifier(ready.runner, ckpt.class_names, ckpt.meta.to_dict(), rt.precision)
