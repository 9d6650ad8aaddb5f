"""Attention maps a person can look at: EANet's memory units over the patches, ViT's rollout.

EANet (external attention): for each block, each memory unit's attention over the patch
grid, the paper's kind of figure. M_k is shared by the heads, so a unit is one vector in
every head; the heads differ only in the projection before it, and the figure shows their
mean. ViT (self-attention): attention rollout (Abnar & Zuidema, 2020): each block's
attention averaged over the heads, the identity added for the residual path and the rows
renormalised, multiplied up the blocks; the model pools by the mean over tokens, so the
image's map is the mean over the query tokens. Computed in float32, in eval mode, by the
layers that predict; `AttentionMaps.save` writes a PNG with the image beside its maps and
the raw tensors (safetensors).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save as safetensors_bytes

from eanet.data import images as imgs
from eanet.errors import ConfigError, DataError
from eanet.fileio import write_bytes
from eanet.models.layers import ExternalAttention, SelfAttention
from eanet.models.transformer import VisionTransformer
from eanet.predict import Failure

AXES = {
    "external": "attention (block, head, token, memory unit): softmax over the tokens, then "
    "L1 over the units; unit_maps (block, unit, row, col): the heads' mean, tokens on the "
    "patch grid",
    "self": "attention (block, head, query token, key token): softmax over the keys; rollout "
    "(block, row, col): the attention rollout up to that block, mean over the queries",
}
# One map (a matplotlib axes) per memory unit and block: drawing 4,096 units x 8 blocks took
# minutes; the figure shows the first units, the tensors hold them all (eanet-cifar-s64: 64).
MAX_DRAWN_UNITS = 64


@dataclass
class AttentionMaps:
    """One image's attention: every block's raw weights, the model's input and its guess."""

    source: str  # the file, or "image K"
    image: torch.Tensor  # uint8 (3, H, W): what the model saw
    kind: str  # "external" (EANet) or "self" (ViT)
    attention: torch.Tensor  # float32 (blocks, heads, N, S) or (blocks, heads, N, N)
    label: str  # the predicted class
    probability: float

    @property
    def grid(self) -> int:
        """Patches per side (the tokens are the patches, row-major)."""
        return math.isqrt(self.attention.shape[2])

    def unit_maps(self) -> torch.Tensor:
        """EANet: each block's memory units over the patch grid, (blocks, S, grid, grid)."""
        blocks, _, _, S = self.attention.shape
        units = self.attention.mean(dim=1).transpose(1, 2)  # (blocks, S, N)
        return units.reshape(blocks, S, self.grid, self.grid)

    def rollout(self) -> torch.Tensor:
        """ViT: the attention rollout after each block, (blocks, grid, grid), each summing to 1."""
        n = self.attention.shape[2]
        eye = torch.eye(n)
        joint, maps = eye, []
        for attn in self.attention.mean(dim=1):  # (N, N) per block
            step = 0.5 * attn + 0.5 * eye  # the residual path as attention to oneself
            joint = (step / step.sum(dim=-1, keepdim=True)) @ joint
            maps.append(joint.mean(dim=0))  # the mean-pooled output's share of each patch
        return torch.stack(maps).reshape(-1, self.grid, self.grid)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The raw tensors that `save` writes: image, attention, and unit_maps or rollout."""
        if self.kind == "external":
            return {"image": self.image, "attention": self.attention, "unit_maps": self.unit_maps()}
        return {"image": self.image, "attention": self.attention, "rollout": self.rollout()}

    def save(self, out: str | Path, name: str) -> tuple[Path, Path]:
        """Write OUT/NAME.png (the image beside its maps; EANet: the first MAX_DRAWN_UNITS
        memory units) and OUT/NAME.safetensors (every unit)."""
        from eanet.attention_plots import plot_rollout, plot_units  # matplotlib when drawing

        out = Path(out)
        png, raw = out / f"{name}.png", out / f"{name}.safetensors"
        picture = self.image.permute(1, 2, 0).numpy()  # (H, W, 3) uint8
        caption = f"predicted: {self.label} ({self.probability:.0%})"
        if self.kind == "external":
            units = self.unit_maps()
            if units.shape[1] > MAX_DRAWN_UNITS:
                caption += f"\nunits 1-{MAX_DRAWN_UNITS} of {units.shape[1]} drawn"
            plot_units(picture, units[:, :MAX_DRAWN_UNITS].numpy(), self.source, caption, png)
        else:
            plot_rollout(picture, self.rollout().numpy(), self.source, caption, png)
        meta = {
            "kind": self.kind,
            "source": self.source,
            "label": self.label,
            "probability": f"{self.probability:.6f}",
            "axes": AXES[self.kind],
        }
        tensors = {k: v.contiguous() for k, v in self.tensors().items()}
        write_bytes(raw, safetensors_bytes(tensors, metadata=meta))
        return png, raw


def attention_kind(model: VisionTransformer) -> str:
    """'external' or 'self': the one kind of attention every block of `model` has."""
    kinds = set()
    for block in model.blocks:
        if isinstance(block.attn, ExternalAttention):
            kinds.add("external")
        elif isinstance(block.attn, SelfAttention):
            kinds.add("self")
        else:
            kinds.add(type(block.attn).__name__)
    if len(kinds) != 1 or not kinds <= {"external", "self"}:
        raise ConfigError(
            f"attention maps need blocks of one kind, external (EANet) or self-attention "
            f"(ViT); this model's are {', '.join(sorted(kinds))}"
        )
    return kinds.pop()


@torch.no_grad()
def maps_of_tensors(
    model: VisionTransformer,
    class_names: Sequence[str],
    images: torch.Tensor,
    sources: Sequence[str],
) -> list[AttentionMaps]:
    """The attention maps of uint8 images (B, 3, H, W) at the model's input size."""
    kind = attention_kind(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    pixels = imgs.to_channels(images, model.config.in_chans)  # grey for a 1-channel model
    x = model.patch_embed(model.normalize(pixels.to(device).float()))  # (B, N, dim)
    per_block = []
    for block in model.blocks:
        per_block.append(block.attn.attention_map(block.norm1(x)).float().cpu())
        x = block(x)
    probs = model.forward_head(x).float().softmax(dim=-1).cpu()
    model.train(was_training)
    attention = torch.stack(per_block, dim=1)  # (B, blocks, heads, N, S or N)
    best = probs.max(dim=-1)
    return [
        AttentionMaps(src, img, kind, attn, class_names[int(i)], float(p))
        for src, img, attn, p, i in zip(
            sources, images.cpu(), attention, best.values, best.indices, strict=True
        )
    ]


def attention_maps(
    model: VisionTransformer,
    class_names: Sequence[str],
    images: Sequence[imgs.ImageLike],
    batch_size: int = 16,
) -> list[AttentionMaps]:
    """The attention maps of images in any form `eanet.images` reads (files, arrays, ...)."""
    if not images:
        raise DataError("no images given for attention maps")
    size = model.config.image_size
    sources = [str(i) if isinstance(i, (str, Path)) else f"image {k}" for k, i in enumerate(images)]
    x = torch.stack([imgs.load_image(img, size, s) for img, s in zip(images, sources, strict=True)])
    out: list[AttentionMaps] = []
    for start in range(0, len(x), batch_size):
        chunk = slice(start, start + batch_size)
        out += maps_of_tensors(model, class_names, x[chunk], sources[chunk])
    return out


def iter_file_maps(
    model: VisionTransformer,
    class_names: Sequence[str],
    files: Sequence[Path],
    batch_size: int = 16,
) -> Iterator[AttentionMaps | Failure]:
    """The attention maps of image files, a batch at a time; unusable files yield Failure."""
    attention_kind(model)  # a model of no single kind fails before any file is read
    size = model.config.image_size
    for start in range(0, len(files), batch_size):
        sources, pixels = [], []
        for path in files[start : start + batch_size]:
            try:
                pixels.append(imgs.load_image(path, size))
                sources.append(str(path))
            except DataError as exc:
                yield Failure(str(path), str(exc).removeprefix(f"{path}: "))
        if sources:
            yield from maps_of_tensors(model, class_names, torch.stack(pixels), sources)
