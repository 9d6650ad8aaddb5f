"""Fine-tuning: start a run from another checkpoint's weights, optionally training only the head.

`load_compatible` copies every tensor whose name and shape match, except:

- the normalization statistics, which are recomputed from the NEW training images (the model
  normalises its inputs with them, and new images have their own colour statistics);
- the classification head, unless the checkpoint was trained on exactly the same class
  names: a head for other classes is re-initialised (it keeps the fresh Keras-style init).

`freeze_backbone` leaves only the head trainable (a linear probe on the pretrained features).
Dropout stays active in the frozen layers during training, which regularises the head.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from eanet import checkpoint
from eanet.errors import CheckpointError
from eanet.models.config import ModelConfig
from eanet.models.registry import MODELS
from eanet.models.transformer import VisionTransformer

log = logging.getLogger(__name__)

HEAD_PREFIX = "head."
# Fields that follow the data (or the fine-tuning) rather than the pretrained architecture.
_FROM_DATA = ("num_classes", "image_size", "in_chans")


def load_compatible(
    model: VisionTransformer, path: str | Path, class_names: list[str]
) -> dict[str, list[str]]:
    """Copy the checkpoint's compatible tensors into `model`; returns {loaded, skipped, unused}.

    `skipped` entries read "name (reason)". Nothing compatible at all is a CheckpointError.
    """
    ckpt = checkpoint.load(path)
    same_classes = ckpt.class_names == list(class_names)
    own = model.state_dict()
    loaded: list[str] = []
    skipped: list[str] = []
    with torch.no_grad():
        for name, tensor in own.items():
            src = ckpt.model_state.get(name)
            if name.startswith("normalize."):
                skipped.append(f"{name} (recomputed from the new training images)")
            elif name.startswith(HEAD_PREFIX) and not same_classes:
                skipped.append(
                    f"{name} (new head: {len(class_names)} classes, the checkpoint has "
                    f"{len(ckpt.class_names)} other ones)"
                )
            elif src is None:
                skipped.append(f"{name} (not in the checkpoint)")
            elif src.shape != tensor.shape:
                skipped.append(
                    f"{name} (shape {tuple(src.shape)} in the checkpoint, {tuple(tensor.shape)} "
                    "here)"
                )
            else:
                tensor.copy_(src)
                loaded.append(name)
    unused = sorted(set(ckpt.model_state) - set(own))
    if not loaded:
        raise CheckpointError(
            f"{path}: no tensor fits the model (names or shapes all differ); fine-tune with the "
            "checkpoint's own architecture (leave out --model and --model-arg)"
        )
    values = sum(own[n].numel() for n in loaded)
    log.info(
        "init from %s: loaded %d of %d tensors (%s values)",
        path,
        len(loaded),
        len(own),
        f"{values:,}",
    )
    if skipped:
        log.info("not loaded (%d): %s", len(skipped), "; ".join(skipped))
    backbone = sum(t.numel() for n, t in own.items() if not n.startswith(("head.", "normalize.")))
    if values < backbone / 2:
        log.warning(
            "only %.0f%% of the backbone comes from %s: its architecture differs from this "
            "model's; leave out --model/--model-arg to fine-tune the checkpoint's own",
            100 * values / max(backbone, 1),
            path,
        )
    if unused:
        log.info("in the checkpoint but not in this model (%d): %s", len(unused), ", ".join(unused))
    return {"loaded": loaded, "skipped": skipped, "unused": unused}


def freeze_backbone(model: VisionTransformer) -> int:
    """Make every parameter but the head's untrainable; returns the trainable count."""
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(HEAD_PREFIX))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info(
        "backbone frozen: %s parameters train (the head), %s frozen",
        f"{trainable:,}",
        f"{frozen:,}",
    )
    return trainable


def inherited_model(path: str | Path) -> tuple[str, dict, int]:
    """(registered name, --model-arg overrides, image size) that rebuild a checkpoint's
    architecture; the class count is left to the new data."""
    ckpt = checkpoint.load(path)
    config = ckpt.model_config
    name = ckpt.meta.model_name
    if name not in MODELS:
        name = "eanet-cifar" if config.attention == "external" else "vit-cifar"
    base = MODELS[name].config.to_dict()
    overrides = {
        k: v for k, v in config.to_dict().items() if k not in _FROM_DATA and base.get(k) != v
    }
    ModelConfig(**{**base, **overrides})  # validate here, where the checkpoint is named
    return name, overrides, config.image_size
