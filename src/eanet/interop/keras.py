"""Import the Keras example's EANet or ViT from a Keras 3 weight file into an eanet model.

Reads a `.weights.h5` (`model.save_weights`) or a `.keras` zip (its `model.weights.h5`),
detects the architecture from the weights alone (MultiHeadAttention groups mean ViT), infers
depth, widths and number of classes from their shapes, and maps every tensor, the
normalization statistics included. The `.keras` config is not trusted: it names the MLP
activation "gelu", which Keras reloads as the erf GELU, while the reference model computes
the tanh approximation; the importer always rebuilds the reference architecture.

Keras layout (Keras 3): `layers/<class>[_k]/vars/<i>`, numbered per class in creation order;
Dense kernels are [in, out]; MultiHeadAttention q/k/v kernels are (dim, heads, key_dim) and
its output kernel (heads, key_dim, dim).
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import re
import unicodedata
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from eanet import checkpoint
from eanet.errors import CheckpointError, ConfigError, DataError, one_line
from eanet.fileio import check_output
from eanet.models.config import ModelConfig
from eanet.models.registry import build_model, count_parameters
from eanet.models.transformer import VisionTransformer
from eanet.train.rundir import refuse_run_file

log = logging.getLogger(__name__)

WEIGHTS_MEMBER = "model.weights.h5"
_SUFFIX = re.compile(r"^(?P<base>.+?)(?:_(?P<n>\d+))?$")
# Top-level Keras layers that may hold weights in the reference models.
_KNOWN = {
    "dense",
    "layer_normalization",
    "multi_head_attention",
    "patch_embedding",
    "normalization",
    "sequential",
}
# What an import reads at most: the weights member of a `.keras` zip (unpacked), and the
# tensors in all. The reference models hold under 3 MB; a crafted file that claims more is
# refused from its declared sizes, before anything is unpacked or read.
MAX_BYTES = 1 << 30
MAX_OBJECTS = 100_000  # groups and datasets in the file (the reference's: about 600)
MAX_DEPTH = 16  # levels of groups (the reference's: 5)


def _require_h5py() -> Any:
    """The h5py module, or a ConfigError that names the extra to install."""
    try:
        import h5py
    except ImportError as exc:
        raise ConfigError(
            "reading Keras weight files needs h5py: pip install 'eanet[keras]'"
        ) from exc
    return h5py


def read_keras_weights(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a `.weights.h5` file, or of the weights inside a `.keras` zip, by path.

    Bounded as the import is: no external storage, links or virtual datasets, no dataset
    over `MAX_BYTES`, and at most `MAX_BYTES` read in all (`read_keras_model` reads only
    the tensors the model needs, after checking their shapes)."""
    path = Path(path)
    with _open_weights(path) as f:
        datasets = _datasets(path, f)
        _check_bytes(path, datasets.values())
        return {name: _read(path, name, ds) for name, ds in datasets.items()}


@contextlib.contextmanager
def _open_weights(path: Path) -> Iterator[Any]:
    """The open HDF5 file of a `.weights.h5`, or of a `.keras` zip's weights member (read
    into memory with a bound); errors of reading it are one-line CheckpointErrors."""
    h5py = _require_h5py()
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; pass a Keras 3 .keras or .weights.h5 file")
    try:
        with h5py.File(_weights_source(path), "r") as f:
            yield f
    except CheckpointError:
        raise
    except (OSError, zipfile.BadZipFile, zlib.error, EOFError, ValueError, KeyError) as exc:
        raise CheckpointError(
            f"{path}: not a readable Keras weights file ({one_line(exc, with_type=True)}); "
            "it may be truncated "
            "or another format: save it again with Keras 3 model.save_weights or model.save"
        ) from exc


def _weights_source(path: Path) -> Path | io.BytesIO:
    """The weights file itself, or a `.keras` zip's weights member in memory; the member's
    declared size is checked before it is decompressed, and the decompression is bounded
    (a zip bomb is refused, not extracted)."""
    if not zipfile.is_zipfile(path):
        return path
    with zipfile.ZipFile(path) as archive:
        try:
            info = archive.getinfo(WEIGHTS_MEMBER)
        except KeyError:
            raise CheckpointError(
                f"{path}: a zip file without {WEIGHTS_MEMBER}; "
                "pass a Keras 3 .keras file or a .weights.h5 file"
            ) from None
        if info.file_size > MAX_BYTES:
            raise _too_big(path, f"{WEIGHTS_MEMBER} unpacks to {info.file_size:,} bytes")
        with archive.open(info) as member:
            data = member.read(MAX_BYTES + 1)  # the declared size may lie
        if len(data) > MAX_BYTES:
            raise _too_big(path, f"{WEIGHTS_MEMBER} unpacks to more than {MAX_BYTES:,} bytes")
    return io.BytesIO(data)


def _too_big(path: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{path}: {what}, more than eanet imports ({MAX_BYTES:,} bytes; the reference "
        "models hold under 3 MB); the file is not the Keras example's EANet/ViT"
    )


def _datasets(path: Path, f: Any) -> dict[str, Any]:
    """Every dataset of the open file by path, none of it read. Refused (one-line
    CheckpointError): soft and external links (they reach outside the file's own objects),
    external storage and virtual datasets (their bytes come from other files), more than
    MAX_OBJECTS objects or MAX_DEPTH levels of groups, a dataset without a shape."""
    h5py = _require_h5py()
    found: dict[str, Any] = {}
    pending: list[tuple[str, Any, int]] = [("", f, 0)]
    seen = 0
    while pending:
        prefix, group, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise _refuse(path, prefix, f"is nested deeper than {MAX_DEPTH} groups")
        for name in group:
            seen += 1
            if seen > MAX_OBJECTS:
                raise _refuse(path, "", f"holds more than {MAX_OBJECTS:,} objects")
            full = f"{prefix}{name}"
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                kind = {h5py.SoftLink: "a soft link", h5py.ExternalLink: "an external link"}.get(
                    type(link), "a link of another kind"
                )
                raise _refuse(path, full, f"is {kind}, which eanet does not follow")
            obj = group[name]
            if isinstance(obj, h5py.Group):
                pending.append((f"{full}/", obj, depth + 1))
            elif isinstance(obj, h5py.Dataset):
                _check_storage(path, full, obj)
                found[full] = obj
    return found


def _check_storage(path: Path, name: str, ds: Any) -> None:
    """Refuse a dataset whose bytes live outside the file, or that has no shape."""
    if ds.id.get_create_plist().get_external_count() > 0:
        raise _refuse(path, name, "has HDF5 external storage (its bytes are another file's)")
    if ds.is_virtual:
        raise _refuse(path, name, "is a virtual dataset (its bytes are other datasets')")
    if ds.shape is None:
        raise _refuse(path, name, "has no shape (an empty dataspace)")


def _refuse(path: Path, name: str, problem: str) -> CheckpointError:
    where = f"{name} " if name else ""
    return CheckpointError(
        f"{path}: {where}{problem}; eanet imports only the weights a Keras 3 "
        "model.save_weights/model.save writes"
    )


def _nbytes(ds: Any) -> int:
    return math.prod(ds.shape) * ds.dtype.itemsize


def _check_bytes(path: Path, datasets: Iterable[Any]) -> None:
    """Refuse to read more than MAX_BYTES in all (known from the shapes, before reading)."""
    total = sum(_nbytes(ds) for ds in datasets)
    if total > MAX_BYTES:
        raise _too_big(path, f"its weights hold {total:,} bytes")


def _check_dtype(path: Path, name: str, ds: Any) -> None:
    """Refuse a dataset that does not hold plain numbers (strings, compound types, ...)."""
    if ds.dtype.kind not in "fiu":
        raise _refuse(path, name, f"holds {ds.dtype} values, not numbers")


def _read(path: Path, name: str, ds: Any) -> np.ndarray:
    """One dataset's values, which must be numbers (checked before reading)."""
    _check_dtype(path, name, ds)
    value = np.asarray(ds[()])
    if value.shape != ds.shape:  # h5py promises it; the checks before relied on it
        raise _refuse(path, name, f"read as shape {value.shape}, declared {ds.shape}")
    return value


def _placeholder(path: Path, name: str, ds: Any) -> np.ndarray:
    """An array of the dataset's shape that holds no memory (zeros, all strides 0), so that
    the architecture is inferred and checked from the shapes before any data is read."""
    if math.prod(ds.shape) > MAX_BYTES:
        raise _too_big(path, f"{name} has shape {ds.shape}")
    return np.broadcast_to(np.float32(0.0), ds.shape)


# --------------------------------------------------------------------------- structure


def _is_layer_weight(key: str) -> bool:
    """Whether a dataset path is a layer's weight, `layers/<layer>/...`."""
    parts = key.split("/")
    return parts[0] == "layers" and len(parts) >= 3


def _split_name(name: str) -> tuple[str, int]:
    """'dense_10' -> ('dense', 10); 'dense' -> ('dense', 0)."""
    m = _SUFFIX.match(name)
    assert m is not None
    return m["base"], int(m["n"] or 0)


@dataclass
class _Layers:
    """The weight-holding layers of a Keras file, grouped by class, in Keras's numbering."""

    path: Path
    groups: dict[str, dict[str, np.ndarray]]
    used: set[str] = field(default_factory=set)

    @classmethod
    def parse(cls, path: Path, tensors: dict[str, np.ndarray]) -> _Layers:
        groups: dict[str, dict[str, np.ndarray]] = {}
        for key, value in tensors.items():
            if _is_layer_weight(key):  # not top-level `vars`, nor optimizer state
                _, group, rest = key.split("/", 2)
                groups.setdefault(group, {})[rest] = value
        if not groups:
            raise CheckpointError(
                f"{path}: holds no Keras layer weights (no 'layers/' group); "
                "pass the weights of the Keras example's EANet or ViT"
            )
        for name in groups:
            if _split_name(name)[0] not in _KNOWN:
                raise CheckpointError(
                    f"{path}: layer '{name}' is not part of the Keras example's EANet or ViT; "
                    "only those two models can be imported"
                )
        return cls(path, groups)

    def numbered(self, base: str) -> list[str]:
        """Names of the groups of one layer class, sorted numerically (dense_2 before dense_10)."""
        names = [n for n in self.groups if _split_name(n)[0] == base]
        return sorted(names, key=lambda n: _split_name(n)[1])

    def get(self, group: str, key: str, ndim: int | None = None) -> np.ndarray:
        """One tensor, marked as used; a missing one is a CheckpointError naming it."""
        try:
            value = self.groups[group][key]
        except KeyError:
            raise CheckpointError(
                f"{self.path}: missing weight layers/{group}/{key}; the file is not a complete "
                "Keras EANet/ViT of the reference"
            ) from None
        if ndim is not None and value.ndim != ndim:
            raise CheckpointError(
                f"{self.path}: layers/{group}/{key} has shape {value.shape}, expected {ndim} "
                "dimensions; the file is not the reference EANet/ViT"
            )
        self.used.add(f"{group}/{key}")
        return value

    def normalization(self) -> str:
        """The group path (within `layers/`) of the Normalization layer's statistics."""
        pattern = re.compile(r"(?:.*/)?normalization(?:_\d+)?/vars/\d+")  # not layer_norm...
        full = (f"{group}/{key}" for group, tensors in self.groups.items() for key in tensors)
        found = sorted({name.rsplit("/vars/", 1)[0] for name in full if pattern.fullmatch(name)})
        if len(found) != 1:
            raise CheckpointError(
                f"{self.path}: expected one Normalization layer (mean, variance, count), found "
                f"{len(found)}; the file is not the reference EANet/ViT"
            )
        return found[0]

    def unused(self) -> list[str]:
        """Weights of the mapped layer groups that no torch tensor took."""
        skip = ("sequential", "normalization")  # augmentation layers may hold RNG state
        return sorted(
            f"{g}/{k}"
            for g, tensors in self.groups.items()
            if _split_name(g)[0] not in skip
            for k in tensors
            if f"{g}/{k}" not in self.used
        )


def _var(layers: _Layers, name: str, i: int, ndim: int) -> np.ndarray:
    group, _, sub = name.partition("/")
    key = f"{sub}/vars/{i}" if sub else f"vars/{i}"
    return layers.get(group, key, ndim)


def _dense(layers: _Layers, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A Keras Dense as a torch Linear: (weight [out, in], bias [out])."""
    return _var(layers, name, 0, 2).T, _var(layers, name, 1, 1)


# --------------------------------------------------------------------------- mapping


@dataclass
class KerasModel:
    """A Keras reference model read into torch: its config and state dict."""

    config: ModelConfig
    state: dict[str, np.ndarray]
    source: Path
    container: str  # ".keras" or ".weights.h5"

    @property
    def kind(self) -> str:
        return "ViT" if self.config.attention == "self" else "EANet"


def _infer(layers: _Layers) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """Read the architecture from the weights and map every tensor to a torch name."""
    state: dict[str, np.ndarray] = {}
    in_chans = _map_normalization(layers, state)
    dim, patch, grid = _map_patch_embedding(layers, state, in_chans)
    depth = _map_layer_norms(layers, state)
    dense = layers.numbered("dense")
    attns = layers.numbered("multi_head_attention")
    if attns:
        fields, mlps = _map_self_attention(layers, state, attns, dense, depth, dim)
    else:
        fields, mlps = _map_external_attention(layers, state, dense, depth, dim)
    _map_mlps_and_head(layers, state, mlps, dense[-1])
    unused = layers.unused()
    if unused:
        raise _fail(layers, f"{len(unused)} weight(s) not used, e.g. layers/{unused[0]}")
    try:
        config = ModelConfig(
            image_size=grid * patch,
            patch_size=patch,
            in_chans=in_chans,
            dim=dim,
            depth=depth,
            mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0],
            num_classes=state["head.weight"].shape[0],
            gelu="tanh",
            ln_eps=1e-5,
            **fields,
        )
    except ConfigError as exc:
        raise _fail(layers, f"its shapes give an impossible model ({exc})") from exc
    return config, state


def _check_layout(layers: _Layers, config: ModelConfig, state: dict[str, np.ndarray]) -> None:
    """Every mapped tensor's shape must be the one the inferred model has (checked on the
    meta device, where nothing is allocated, before any tensor is read)."""
    try:
        checkpoint.check_structure(config, {k: tuple(v.shape) for k, v in state.items()})
    except (ValueError, ConfigError) as exc:
        raise _fail(layers, f"its shapes do not fit the model they imply ({exc})") from exc


def _fail(layers: _Layers, what: str) -> CheckpointError:
    return CheckpointError(f"{layers.path}: {what}; the file is not the Keras example's EANet/ViT")


def _map_normalization(layers: _Layers, state: dict) -> int:
    """The Normalization layer's mean, variance and count; returns the channel count."""
    norm = layers.normalization()
    ngroup, _, nsub = norm.partition("/")
    prefix = f"{nsub}/" if nsub else ""
    mean = layers.get(ngroup, f"{prefix}vars/0").reshape(-1)
    var = layers.get(ngroup, f"{prefix}vars/1").reshape(-1)
    count = layers.get(ngroup, f"{prefix}vars/2").reshape(-1)
    if mean.shape != var.shape or count.size != 1:
        raise _fail(
            layers, f"normalization statistics have shapes {mean.shape}, {var.shape}, {count.shape}"
        )
    state["normalize.mean"], state["normalize.var"] = mean, var
    state["normalize.count"] = np.asarray(count[0], dtype=np.int64)
    return mean.size


def _map_patch_embedding(layers: _Layers, state: dict, in_chans: int) -> tuple[int, int, int]:
    """The patch projection and position embedding; returns (width, patch side, grid side)."""
    embeds = layers.numbered("patch_embedding")
    if len(embeds) != 1:
        raise _fail(layers, f"expected one PatchEmbedding layer, found {len(embeds)}")
    pos = _var(layers, f"{embeds[0]}/pos_embed", 0, 2)
    proj_w, proj_b = _dense(layers, f"{embeds[0]}/proj")
    num_patches, dim = pos.shape
    patch_dim = proj_w.shape[1]
    patch = math.isqrt(patch_dim // in_chans)
    grid = math.isqrt(num_patches)
    if patch * patch * in_chans != patch_dim or grid * grid != num_patches:
        raise _fail(layers, f"patch embedding {proj_w.shape[::-1]} with {num_patches} positions")
    state["patch_embed.proj.weight"], state["patch_embed.proj.bias"] = proj_w, proj_b
    state["patch_embed.pos_embed"] = pos
    return dim, patch, grid


def _map_layer_norms(layers: _Layers, state: dict) -> int:
    """Two LayerNorms per block, in creation order; returns the depth."""
    norms = layers.numbered("layer_normalization")
    depth = len(norms) // 2
    if depth < 1 or len(norms) % 2:
        raise _fail(layers, f"{len(norms)} LayerNormalization layers (two per block expected)")
    for b in range(depth):
        for j, name in enumerate(norms[2 * b : 2 * b + 2], start=1):
            state[f"blocks.{b}.norm{j}.weight"] = _var(layers, name, 0, 1)
            state[f"blocks.{b}.norm{j}.bias"] = _var(layers, name, 1, 1)
    return depth


def _map_self_attention(
    layers: _Layers, state: dict, attns: list[str], dense: list[str], depth: int, dim: int
) -> tuple[dict, list]:
    """ViT: Keras MultiHeadAttention per block; returns config fields and the MLP layer pairs."""
    if len(attns) != depth or len(dense) != 2 * depth + 1:
        raise _fail(
            layers, f"{len(attns)} attention and {len(dense)} Dense layers for {depth} blocks"
        )
    q_kernel = _var(layers, f"{attns[0]}/query_dense", 0, 3)
    heads, key_dim = q_kernel.shape[1:]
    if key_dim != dim:
        raise _fail(layers, f"attention key_dim {key_dim} differs from the embedding width {dim}")
    for b, name in enumerate(attns):
        for keras_name, torch_name in (("query", "q"), ("key", "k"), ("value", "v")):
            kernel = _var(layers, f"{name}/{keras_name}_dense", 0, 3)  # (dim, h, kd)
            bias = _var(layers, f"{name}/{keras_name}_dense", 1, 2)  # (h, kd)
            # Head-major flattening matches torch's view(B, N, heads, key_dim).
            state[f"blocks.{b}.attn.{torch_name}.weight"] = kernel.reshape(dim, -1).T
            state[f"blocks.{b}.attn.{torch_name}.bias"] = bias.reshape(-1)
        kernel = _var(layers, f"{name}/output_dense", 0, 3)  # (h, kd, dim)
        state[f"blocks.{b}.attn.proj.weight"] = kernel.reshape(-1, kernel.shape[-1]).T
        state[f"blocks.{b}.attn.proj.bias"] = _var(layers, f"{name}/output_dense", 1, 1)
    fields = {"attention": "self", "num_heads": heads}
    return fields, [dense[2 * b : 2 * b + 2] for b in range(depth)]


def _map_external_attention(
    layers: _Layers, state: dict, dense: list[str], depth: int, dim: int
) -> tuple[dict, list]:
    """EANet: 4 attention Dense + 2 MLP Dense per block; returns config fields and MLP pairs."""
    if len(dense) != 6 * depth + 1:
        raise _fail(layers, f"{len(dense)} Dense layers for {depth} external-attention blocks")
    inner = _var(layers, dense[0], 0, 2).shape[1]
    head_dim, memory = _var(layers, dense[1], 0, 2).shape
    if inner % dim or inner % head_dim or (inner // head_dim) % (inner // dim):
        raise _fail(layers, f"external attention widths {dim} -> {inner}, heads of {head_dim}")
    coefficient = inner // dim
    fields = {
        "attention": "external",
        "dim_coefficient": coefficient,
        "num_heads": inner // head_dim // coefficient,
        "memory_size": None if memory == dim // coefficient else memory,
    }
    for b in range(depth):
        names = dense[6 * b : 6 * b + 6]
        for name, torch_name in zip(names[:4], ("proj_in", "mk", "mv", "proj"), strict=True):
            w, bias = _dense(layers, name)
            state[f"blocks.{b}.attn.{torch_name}.weight"] = w
            state[f"blocks.{b}.attn.{torch_name}.bias"] = bias
    return fields, [dense[6 * b + 4 : 6 * b + 6] for b in range(depth)]


def _map_mlps_and_head(layers: _Layers, state: dict, mlps: list, head: str) -> None:
    """Each block's two MLP Dense layers, then the classification head (the last Dense)."""
    for b, (fc1, fc2) in enumerate(mlps):
        for name, torch_name in ((fc1, "fc1"), (fc2, "fc2")):
            w, bias = _dense(layers, name)
            state[f"blocks.{b}.mlp.{torch_name}.weight"] = w
            state[f"blocks.{b}.mlp.{torch_name}.bias"] = bias
    state["head.weight"], state["head.bias"] = _dense(layers, head)


def read_keras_model(path: str | Path) -> KerasModel:
    """Read a Keras reference EANet/ViT file: the inferred config and the mapped tensors."""
    path = Path(path)
    with _open_weights(path) as f:
        datasets = {k: v for k, v in _datasets(path, f).items() if _is_layer_weight(k)}
        # First from the shapes alone: the architecture, and every tensor it needs checked
        # against the model it implies; only then are those tensors (and no others) read.
        shapes = {k: _placeholder(path, k, ds) for k, ds in datasets.items()}
        layers = _Layers.parse(path, shapes)
        config, state = _infer(layers)
        _check_layout(layers, config, state)
        needed = {f"layers/{name}": datasets[f"layers/{name}"] for name in layers.used}
        _check_bytes(path, needed.values())
        for name, ds in needed.items():
            _check_dtype(path, name, ds)
        tensors = {name: _read(path, name, ds) for name, ds in needed.items()}
    config, state = _infer(_Layers.parse(path, tensors))
    container = ".keras" if zipfile.is_zipfile(path) else ".weights.h5"
    return KerasModel(config, state, path, container)


def to_torch(keras_model: KerasModel) -> VisionTransformer:
    """Build the eanet model and load the mapped tensors; every shape must match exactly."""
    model = build_model(keras_model.config)
    expected = model.state_dict()
    state = keras_model.state
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state)) or sorted(set(state) - set(expected))
        raise CheckpointError(f"{keras_model.source}: cannot map weights for {missing[:3]}")
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        tensor = torch.from_numpy(np.array(value)).to(expected[key].dtype)  # copy, keeps 0-d
        if tensor.shape != expected[key].shape:
            raise CheckpointError(
                f"{keras_model.source}: weight for {key} has shape {tuple(tensor.shape)}, the "
                f"model needs {tuple(expected[key].shape)}; the file is not the reference model"
            )
        tensors[key] = tensor
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def load_keras(path: str | Path) -> VisionTransformer:
    """An eanet model (eval mode) holding the weights of a Keras reference model file."""
    return to_torch(read_keras_model(path))


# --------------------------------------------------------------------------- class names


def cifar100_class_names() -> list[str]:
    """The 100 CIFAR-100 fine label names, read from the slice shipped in the package."""
    from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
    from eanet.data.load import load_dataset

    data_log = logging.getLogger("eanet.data")
    level = data_log.level
    data_log.setLevel(logging.WARNING)  # "loading cifar100 ..." would mislead here
    try:
        data = load_dataset("cifar100", SAMPLE_ARCHIVE, md5=SAMPLE_MD5, progress=False)
    finally:
        data_log.setLevel(level)
    return data.class_names


def read_class_names(path: str | Path) -> list[str]:
    """Class names from a text file, one per line (blank lines ignored)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(
            f"{path}: cannot read the class names ({one_line(exc, with_type=True)}); "
            "pass a UTF-8 text file with one class name per line"
        ) from exc
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise DataError(f"{path}: no class names in it; write one class name per line")
    seen: dict[str, int] = {}
    for number, name in enumerate(names, 1):
        # NFC: "café" typed precomposed or with a combining accent is one name
        first = seen.setdefault(unicodedata.normalize("NFC", name), number)
        if first != number:
            raise DataError(
                f"{path}: class name {name!r} (name {number}) repeats name {first}"
                f"{'' if name == names[first - 1] else ' in another Unicode form'}; "
                "every class needs its own name"
            )
    return names


# --------------------------------------------------------------------------- import


def import_keras(
    source: str | Path,
    out: str | Path,
    class_names: list[str] | None = None,
    overwrite: bool = False,
) -> dict:
    """Convert a Keras reference model file into an eanet checkpoint; return a summary.

    `out` is a `.safetensors` file, or a directory that gets `checkpoint.safetensors`; an
    existing one is replaced only with `overwrite`, never the source nor a training run's.
    Class names default to CIFAR-100's when the model has 100 outputs.
    """
    out = Path(out)
    target = out if out.suffix == ".safetensors" else out / checkpoint.CHECKPOINT_NAME
    refuse_run_file(target)
    check_output(target, overwrite=overwrite, inputs=[source])
    keras_model = read_keras_model(source)
    cfg = keras_model.config
    if class_names is None:
        if cfg.num_classes != 100:
            raise ConfigError(
                f"{source}: the model has {cfg.num_classes} classes, not CIFAR-100's 100; "
                "pass --class-names FILE with one name per line"
            )
        class_names = cifar100_class_names()
    if len(class_names) != cfg.num_classes:
        raise ConfigError(
            f"{len(class_names)} class names given but {source} has {cfg.num_classes} "
            "outputs; give exactly one name per output"
        )
    model = to_torch(keras_model)
    meta = checkpoint.CheckpointMeta(
        class_names=list(class_names),
        model_config=model.config,
        source={
            "kind": "keras",
            "file": str(keras_model.source),
            "container": keras_model.container,
        },
    )
    checkpoint.save(target, model, meta)
    summary = {
        "model": keras_model.kind,
        "depth": cfg.depth,
        "num_classes": cfg.num_classes,
        "parameters": count_parameters(model),
        "checkpoint": str(target),
        "source": str(keras_model.source),
    }
    log.debug("imported %s from %s into %s", keras_model.kind, source, target)
    return summary
