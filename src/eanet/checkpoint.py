"""The one checkpoint format: a single safetensors file, tensors plus JSON metadata.

Nothing is unpickled: weights, optimizer moments and RNG states are tensors; the model
config, class names, epoch, history and optimizer hyper-parameters are JSON in the
safetensors header (`CheckpointMeta`). One file means one atomic rename per save: the file
is serialised to bytes in memory and written through `fileio.atomic_path`, so a kill leaves
at most one `.checkpoint.safetensors.*.tmp` (which the next training start removes) and the
file gets the umask's permissions.

Integrity: the header also holds `sha256`, a digest of the other header entries and of every
tensor (name, dtype, shape, bytes), checked at load: a flipped bit in the tensor data or an
edited header is "checksum mismatch", not silently different weights. It guards against
corruption and accidental edits, not against a forger, who can recompute it.

Structure: before anything is built, the model config in the metadata must describe exactly
the model tensors in the file (names and shapes, from a model built on the `meta` device,
which allocates nothing) and stay under `MAX_PARAMETERS`. So a header that claims a huge
model (a forged config with a recomputed checksum, or none) is "checkpoint metadata is
damaged" in milliseconds, never an allocation of what the file does not hold.

Checkpoints without `sha256` (written before the digest existed) still load: the digest is no
defence against a forger anyway, and the structure check above applies to them too, so such a
file can only be as large as the tensors it really holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as serialize

from eanet.errors import CheckpointError, ConfigError, one_line
from eanet.fileio import BEST_NAME, CHECKPOINT_NAME, atomic_path, resolve  # noqa: F401 (re-exported)
from eanet.models.config import ModelConfig
from eanet.models.registry import build_model
from eanet.models.transformer import VisionTransformer

FORMAT = "eanet-checkpoint"
FORMAT_VERSION = 1
EMA_PREFIX = "ema."  # extra tensors holding the moving average of the weights
# Far above any model of this project (the reference has 0.36 M): a header claiming more is
# refused before anything is built.
MAX_PARAMETERS = 2_000_000_000
# The metadata JSON, bounded before it is parsed: a checkpoint's is a few KB (a long run's
# history included); nesting 200,000 deep made json.loads raise RecursionError.
MAX_META_BYTES = 16 << 20
MAX_META_DEPTH = 64  # eanet writes 4 levels (optimizer param_groups, history rows)
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]")


@dataclass
class CheckpointMeta:
    """The metadata of a checkpoint (JSON in the safetensors header), typed.

    On disk it is the same JSON object as before the type existed; keys this version does not
    know are kept in `extra` and written back unchanged.
    """

    class_names: list[str]
    model_config: ModelConfig = field(default_factory=ModelConfig)
    model_name: str | None = None  # the registered name, e.g. "eanet-cifar"
    train_config: dict | None = None  # TrainConfig.to_dict() of the run that wrote it
    eanet_version: str | None = None
    epoch: int | None = None  # the last complete epoch (training checkpoints)
    history: list[dict] | None = None  # one row per epoch (training checkpoints)
    source: dict | None = None  # where an imported model came from (import-keras)
    optimizer: dict | None = None  # {"param_groups": [...]} with the optimizer's tensors
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The JSON object stored in the header (absent fields are left out)."""
        out: dict[str, Any] = {"class_names": list(self.class_names)}
        out["model_config"] = self.model_config.to_dict()
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name not in ("class_names", "model_config", "extra") and value is not None:
                out[f.name] = value
        return {**self.extra, **out}

    @classmethod
    def from_dict(cls, data: object) -> CheckpointMeta:
        """Parse and check the header's object; TypeError/ValueError/KeyError/ConfigError
        where a field is missing or has an impossible type."""
        if not isinstance(data, dict):
            raise TypeError(f"metadata is a {type(data).__name__}, not an object")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        meta = cls(
            class_names=data["class_names"],
            model_config=ModelConfig.from_dict(data["model_config"]),
            extra={k: v for k, v in data.items() if k not in known},
            **{k: data[k] for k in known - {"class_names", "model_config"} if k in data},
        )
        meta.check()
        return meta

    def check(self) -> None:
        """Raise TypeError/ValueError where the fields have impossible types or values."""
        names = self.class_names
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("class_names is not a list of strings")
        if len(names) != self.model_config.num_classes:
            raise ValueError(f"{len(names)} class names for a model with other classes")
        epoch = self.epoch
        if epoch is not None and (not isinstance(epoch, int) or isinstance(epoch, bool)):
            raise ValueError(f"epoch {epoch!r} is not a count of epochs")
        if epoch is not None and epoch < 0:
            raise ValueError(f"epoch {epoch!r} is not a count of epochs")
        history = self.history
        if history is not None and (
            not isinstance(history, list) or not all(isinstance(h, dict) for h in history)
        ):
            raise TypeError("history is not a list of objects")
        for name in ("model_name", "eanet_version"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} is not a string")
        for name in ("train_config", "source"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} is not an object")
        if self.optimizer is not None:
            groups = self.optimizer["param_groups"]
            if not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
                raise TypeError("optimizer param_groups is not a list of objects")


@dataclass
class Checkpoint:
    """What a checkpoint holds, loaded."""

    meta: CheckpointMeta
    model_state: dict[str, torch.Tensor]
    optimizer_state: dict | None = None
    rng_state: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # save(extra=...)

    @property
    def model_config(self) -> ModelConfig:
        return self.meta.model_config

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.class_names)


def save(
    path: str | Path,
    model: VisionTransformer,
    meta: CheckpointMeta | dict,
    optimizer: torch.optim.Optimizer | None = None,
    rng: bool = False,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write model weights (+ optimizer state, RNG states, `extra` tensors) and `meta` atomically.

    `meta` is a CheckpointMeta or its dict form; its model config is the model's own.
    `extra` (e.g. the EMA weights) is stored under the prefix "extra." and read back into
    `Checkpoint.extra`.
    """
    if isinstance(meta, dict):
        meta = CheckpointMeta.from_dict({**meta, "model_config": model.config.to_dict()})
    meta = dataclasses.replace(meta, model_config=model.config, optimizer=None)
    meta.check()  # e.g. as many class names as the model has outputs
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if optimizer is not None:
        state = optimizer.state_dict()
        for idx, pstate in state["state"].items():
            for key, value in pstate.items():
                tensors[f"optim.{idx}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
        meta.optimizer = {"param_groups": state["param_groups"]}
    if rng:
        tensors["rng.cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                tensors[f"rng.cuda{i}"] = s
    for name, value in (extra or {}).items():
        tensors[f"extra.{name}"] = value.detach().cpu().contiguous()
    header = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "meta": json.dumps(meta.to_dict()),
    }
    header["sha256"] = digest(tensors, header)
    # Serialised here and written through atomic_path: safetensors' own save_file would
    # write (and leave, when killed) a second temporary file and make the file mode 0600.
    data = serialize(tensors, metadata=header)
    with atomic_path(path) as tmp:
        _write_data(tmp, data)
        _test_slow_save()


def _write_data(tmp: Path, data: bytes) -> None:
    """Write the serialised checkpoint into the temporary file (tests make this fail)."""
    tmp.write_bytes(data)


def digest(tensors: dict[str, torch.Tensor], header: dict[str, str]) -> str:
    """sha256 of the header entries (but `sha256`) and of every tensor's name, type and bytes."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted((k, v) for k, v in header.items() if k != "sha256")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _test_slow_save() -> None:
    """Test hook: EANET_TEST_SLOW_SAVE=SECONDS sleeps between writing the temporary file and
    renaming it over the checkpoint, so a test can kill a run in the middle of a save."""
    delay = os.environ.get("EANET_TEST_SLOW_SAVE", "")
    if delay.replace(".", "", 1).isdigit():
        time.sleep(float(delay))


def load(path: str | Path) -> Checkpoint:
    """Read a checkpoint file or run directory; anything wrong is a CheckpointError."""
    path = resolve(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: not a readable safetensors checkpoint ({one_line(exc)}); "
            "it may be truncated or corrupt, re-create it"
        ) from exc
    if header.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an eanet checkpoint (no '{FORMAT}' header)")
    if "sha256" in header and header["sha256"] != digest(tensors, header):
        raise CheckpointError(
            f"{path}: checksum mismatch: the file was modified or corrupted; "
            "restore it from a copy or re-create it"
        )
    if header.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(
            f"{path}: checkpoint format {header.get('format_version')} is "
            f"not supported (this eanet reads {FORMAT_VERSION})"
        )
    try:
        meta = CheckpointMeta.from_dict(parse_meta(header["meta"]))
        model = {k.removeprefix("model."): t for k, t in tensors.items() if k.startswith("model.")}
        check_structure(meta.model_config, {k: tuple(t.shape) for k, t in model.items()})
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{path}: checkpoint metadata is damaged ({one_line(exc)})") from exc
    return _unpack(path, meta, tensors)


def parse_meta(text: str) -> object:
    """The metadata JSON parsed, its size and nesting depth checked first (ValueError)."""
    if len(text) > MAX_META_BYTES:
        raise ValueError(f"{len(text):,} characters of metadata, more than {MAX_META_BYTES:,}")
    depth = 0
    for bracket in _NOT_BRACKET.sub("", _JSON_STRING.sub('""', text)):
        depth += 1 if bracket in "[{" else -1
        if depth > MAX_META_DEPTH:
            raise ValueError(f"metadata nested deeper than {MAX_META_DEPTH} levels")
    return json.loads(text)


def _unpack(path: Path, meta: CheckpointMeta, tensors: dict[str, torch.Tensor]) -> Checkpoint:
    """Sort the file's tensors into weights, optimizer state and RNG states."""
    ckpt = Checkpoint(meta=meta, model_state={})
    optim: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        if kind == "model":
            ckpt.model_state[rest] = value
        elif kind == "optim":
            idx, _, name = rest.partition(".")
            if not idx.isdigit():
                raise CheckpointError(f"{path}: unexpected tensor {key!r}; the file is damaged")
            optim.setdefault(int(idx), {})[name] = value
        elif kind == "rng":
            ckpt.rng_state[rest] = value
        elif kind == "extra":
            ckpt.extra[rest] = value
    if meta.optimizer is not None:
        groups = meta.optimizer["param_groups"]
        for group in groups:
            if "betas" in group:
                group["betas"] = tuple(group["betas"])
        ckpt.optimizer_state = {"state": optim, "param_groups": groups}
    return ckpt


def _meta_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The state-dict shapes of the model `config` describes, built on the meta device
    (no memory, no initialisation cost)."""
    with torch.device("meta"):
        model = build_model(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _size(shapes: dict[str, tuple[int, ...]]) -> int:
    total = 0
    for shape in shapes.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def check_structure(config: ModelConfig, found: dict[str, tuple[int, ...]]) -> None:
    """ValueError unless `config` describes exactly the tensors `found` (names and shapes).

    The size a config implies is worked out from one- and two-block models first (blocks
    are alike), so a config claiming thousands of wide blocks is refused without building
    them; only a config whose size matches the file's tensors is built, on the meta device.
    """
    one = _size(_meta_shapes(dataclasses.replace(config, depth=1)))
    per_block = _size(_meta_shapes(dataclasses.replace(config, depth=2))) - one
    implied = one + (config.depth - 1) * per_block
    held = _size(found)
    if implied > MAX_PARAMETERS:
        raise ValueError(
            f"the model config implies {implied:,} parameters, more than any eanet model "
            f"({MAX_PARAMETERS:,}); the file holds {held:,}"
        )
    if implied != held:
        raise ValueError(
            f"the model config implies {implied:,} parameters but the file holds {held:,}"
        )
    expected = _meta_shapes(config)
    if expected != found:
        wrong = sorted(set(expected) ^ set(found)) or sorted(
            k for k in expected if expected[k] != found[k]
        )
        raise ValueError(f"the model config does not describe the file's tensors ({wrong[:3]})")


def load_model(
    path: str | Path, device: str | torch.device = "cpu", weights: str = "last"
) -> tuple[VisionTransformer, Checkpoint]:
    """Rebuild the model a checkpoint was saved from, in eval mode, on `device`.

    `weights`: the last epoch's ("last"), the best validation top-1's ("best") or the
    moving average of the weights ("ema", a run trained with --ema-decay).
    """
    ckpt = load(resolve(path, weights))
    if weights == "ema":
        ckpt.model_state = ema_weights(ckpt, path)
    model = build_model(ckpt.model_config)
    load_weights(model, ckpt, path)
    return model.to(device).eval(), ckpt


def ema_weights(ckpt: Checkpoint, path: str | Path) -> dict[str, torch.Tensor]:
    """The moving-average weights saved in a training checkpoint; CheckpointError if none."""
    state = {k[len(EMA_PREFIX) :]: v for k, v in ckpt.extra.items() if k.startswith(EMA_PREFIX)}
    if not state:
        raise CheckpointError(
            f"{path}: holds no moving average of the weights (the run was trained without "
            "--ema-decay); use --weights last or best"
        )
    return state


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


def restore_training(
    model: VisionTransformer, optimizer: torch.optim.Optimizer, ckpt: Checkpoint, path: str | Path
) -> None:
    """Weights, AdamW state and RNG states of a training checkpoint, for `--resume`."""
    meta = ckpt.meta
    if ckpt.optimizer_state is None or meta.epoch is None or meta.history is None:
        raise CheckpointError(
            f"{path}: holds weights only, no optimizer state, epoch and history; it cannot "
            "be resumed (fine-tune from it with --init-from)"
        )
    load_weights(model, ckpt, path)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for idx, state in ckpt.optimizer_state["state"].items():
        fits = idx < len(params) and all(
            v.ndim == 0 or v.shape == params[idx].shape for v in state.values()
        )
        if not fits:
            raise CheckpointError(
                f"{path}: optimizer state {idx} does not fit the model's parameters; "
                "the checkpoint was tampered with"
            )
    try:
        optimizer.load_state_dict(ckpt.optimizer_state)
        restore_rng(ckpt)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: optimizer or RNG state cannot be restored ({one_line(exc)}); the "
            "checkpoint is damaged or from another training setup"
        ) from exc
