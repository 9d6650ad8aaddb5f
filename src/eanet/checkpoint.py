"""The one checkpoint format: a single safetensors file, tensors plus JSON metadata.

Nothing is unpickled: weights, optimizer moments and RNG states are tensors; the model
config, class names, epoch, history and optimizer hyper-parameters are JSON in the
safetensors header. One file means one atomic rename per save.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from eanet.errors import CheckpointError, ConfigError
from eanet.fileio import atomic_path
from eanet.models import ModelConfig, VisionTransformer, build_model

FORMAT = "eanet-checkpoint"
FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.safetensors"


@dataclass
class Checkpoint:
    """What a checkpoint holds, loaded."""

    meta: dict
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None = None
    rng_state: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.meta["model_config"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])


def resolve(path: str | Path) -> Path:
    """A run directory or a checkpoint file -> the checkpoint file."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{path}: no checkpoint there; pass a run directory written by "
            "`eanet train` or a .safetensors checkpoint"
        )
    return path


def save(
    path: str | Path,
    model: VisionTransformer,
    meta: dict,
    optimizer: torch.optim.Optimizer | None = None,
    rng: bool = False,
) -> None:
    """Write model weights (+ optimizer state and RNG states) and `meta` atomically."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {**meta, "model_config": model.config.to_dict()}
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, pstate in state["state"].items():
            for key, value in pstate.items():
                tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        meta["optimizer"] = {"param_groups": state["param_groups"]}
    if rng:
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda{i}"] = s
    header = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "meta": json.dumps(meta)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint file or run directory; anything wrong is a CheckpointError."""
    path = resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors checkpoint ({exc}); "
            "it may be truncated or corrupt, re-create it"
        ) from exc
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an eanet checkpoint (no '{FORMAT}' header)")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format {header.get('format_version')} is "
            f"not supported (this eanet reads {FORMAT_VERSION})"
        )
    try:
        meta = json.loads(header["meta"])
        ModelConfig.from_dict(meta["model_config"])
        list(meta["class_names"])
    except (KeyError, TypeError, json.JSONDecodeError, ConfigError) as exc:
        raise CheckpointError(f"{path}: checkpoint metadata is damaged ({exc})") from exc
    ckpt = Checkpoint(meta=meta, model_state={})
    optim: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "model":
            ckpt.model_state[rest] = value
        elif kind == "optim":
            idx, _, name = rest.partition(".")
            optim.setdefault(int(idx), {})[name] = value
        elif kind == "rng":
            ckpt.rng_state[rest] = value
    if "optimizer" in meta:
        groups = meta["optimizer"]["param_groups"]
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        ckpt.optimizer_state = {"state": optim, "param_groups": groups}
    return ckpt


def load_model(
    path: str | Path, device: str | torch.device = "cpu"
) -> tuple[VisionTransformer, Checkpoint]:
    """Rebuild the model a checkpoint was saved from, in eval mode, on `device`."""
    ckpt = load(path)
    model = build_model(ckpt.model_config)
    load_weights(model, ckpt, path)
    return model.to(device).eval(), ckpt


def load_weights(model: VisionTransformer, ckpt: Checkpoint, path: str | Path) -> None:
    """Load the checkpoint's weights into `model`, which must have the same architecture."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ckpt.model_state))
    unexpected = sorted(set(ckpt.model_state) - set(expected))
    wrong = sorted(
        k
        for k in set(expected) & set(ckpt.model_state)
        if expected[k].shape != ckpt.model_state[k].shape
    )
    if missing or unexpected or wrong:
        detail = (
            (missing and f"missing {missing[:3]}")
            or (unexpected and f"unexpected {unexpected[:3]}")
            or f"shape differs for {wrong[:3]}"
        )
        raise CheckpointError(
            f"{path}: weights do not fit the model ({detail}); the checkpoint "
            "belongs to another architecture or was tampered with"
        )
    model.load_state_dict(ckpt.model_state)


def restore_rng(ckpt: Checkpoint) -> None:
    """Put back the RNG states saved with `rng=True` (exact resume)."""
    if "cpu" in ckpt.rng_state:
        torch.set_rng_state(ckpt.rng_state["cpu"])
    cuda = [ckpt.rng_state[k] for k in sorted(ckpt.rng_state) if k.startswith("cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
