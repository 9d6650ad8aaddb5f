"""Fuzzing every loader of outside bytes: a valid result or a one-line error, never a crash.

The property, for each: whatever the input (random bytes, a real file truncated or with bytes
changed, pickles with random keys, values, shapes and dtypes), the loader returns a result
that satisfies its contract, or raises DataError (data, images) / CheckpointError
(checkpoints). Any other exception is a bug. EANET_FUZZ_EXAMPLES=5000 fuzzes longer.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import tarfile
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image
from safetensors.torch import save_file

from eanet import checkpoint
from eanet.data import cifar, images
from eanet.data.cifar import CIFAR100, SAMPLE_ARCHIVE
from eanet.errors import CheckpointError, DataError
from eanet.models.config import ModelConfig
from eanet.models.registry import create_model

EXAMPLES = int(os.environ.get("EANET_FUZZ_EXAMPLES", "60"))  # raise it for a long fuzzing run
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FEW = settings(FUZZ, max_examples=max(EXAMPLES // 3, 1))


# --------------------------------------------------------------------------- CIFAR pickles

KEYS = st.sampled_from(
    ["data", "fine_labels", "labels", "coarse_labels", "fine_label_names", "filenames"]
)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats()
    | st.text(max_size=4)
    | st.binary(max_size=8)
)
ARRAYS = hnp.arrays(
    dtype=st.sampled_from([np.uint8, np.int8, np.int64, np.uint64, np.float32, np.bool_, "U2"]),
    shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4),
)
IMAGE_ROWS = st.integers(0, 3).flatmap(
    lambda n: hnp.arrays(np.uint8, st.sampled_from([(n, 3072), (n, 3071), (n, 3, 32, 32)]))
)
LABELS = st.lists(st.integers(-2, 101), max_size=4) | st.lists(SCALARS, max_size=3) | ARRAYS
VALUES = SCALARS | ARRAYS | IMAGE_ROWS | LABELS | st.lists(st.text(max_size=3), max_size=3)


def batch_dicts() -> st.SearchStrategy:
    """Dicts that look more or less like a CIFAR batch: str or bytes keys, any values."""
    key = KEYS | st.text(max_size=3) | KEYS.map(str.encode) | st.integers(0, 3)
    loose = st.dictionaries(key, VALUES, max_size=4)
    close = st.fixed_dictionaries({"data": IMAGE_ROWS | VALUES, "fine_labels": LABELS | VALUES})
    return loose | close


def _check_batch_contract(result: tuple[np.ndarray, np.ndarray]) -> None:
    images_, labels = result
    assert images_.dtype == np.uint8 and images_.ndim == 2 and images_.shape[1] == 3072
    assert labels.dtype == np.int64 and labels.shape == (len(images_),)
    assert len(labels) == 0 or (labels.min() >= 0 and labels.max() < 100)


@FUZZ
@given(obj=batch_dicts() | VALUES)
def test_batch_validation_accepts_or_raises_data_error(obj):
    try:
        result = cifar._check_batch(obj, "fuzz", CIFAR100)
    except DataError as exc:
        assert str(exc).startswith("fuzz: ") and "\n" not in str(exc)
        return
    _check_batch_contract(result)


@FUZZ
@given(
    obj=st.fixed_dictionaries(
        {"fine_label_names": st.lists(st.text(max_size=3) | st.binary(max_size=3) | SCALARS)}
    )
    | st.fixed_dictionaries(
        {"fine_label_names": st.lists(st.text(max_size=3), min_size=100, max_size=100)}
    )
    | batch_dicts()
)
def test_meta_validation_accepts_or_raises_data_error(obj):
    try:
        names = cifar._check_meta(obj, "fuzz", CIFAR100)
    except DataError:
        return
    assert len(names) == 100 and all(isinstance(n, str) for n in names)


@FUZZ
@given(obj=batch_dicts(), protocol=st.integers(0, pickle.HIGHEST_PROTOCOL))
def test_restricted_unpickler_round_trip(obj, protocol):
    try:
        payload = pickle.dumps(obj, protocol=protocol)
    except (pickle.PicklingError, TypeError, ValueError):
        assume(False)
    try:
        loaded = cifar._unpickle(io.BytesIO(payload), "fuzz")
        result = cifar._check_batch(loaded, "fuzz", CIFAR100)
    except DataError:
        return
    _check_batch_contract(result)


def _valid_batch_pickle(n: int = 2) -> bytes:
    rng = np.random.default_rng(0)
    batch = {
        "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        "fine_labels": [3, 99][:n],
        "filenames": [b"a.png", b"b.png"][:n],
    }
    return pickle.dumps(batch, protocol=2)


@st.composite
def mutated(draw, payload: bytes) -> bytes:
    """`payload` with some bytes replaced, a slice cut out, bytes inserted, or truncated."""
    out = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["replace", "delete", "insert", "truncate"]))
        at = draw(st.integers(0, max(len(out) - 1, 0)))
        if kind == "replace" and out:
            out[at] = draw(st.integers(0, 255))
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 16))]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del out[at:]
    return bytes(out)


@FUZZ
@given(payload=mutated(_valid_batch_pickle()) | st.binary(max_size=200))
def test_damaged_pickle_bytes_give_data_error(payload):
    try:
        loaded = cifar._unpickle(io.BytesIO(payload), "fuzz")
        result = cifar._check_batch(loaded, "fuzz", CIFAR100)
    except DataError as exc:
        assert "\n" not in str(exc)
        return
    _check_batch_contract(result)


@pytest.fixture(scope="module")
def real_meta() -> bytes:
    with tarfile.open(SAMPLE_ARCHIVE) as tar:
        return tar.extractfile("cifar-100-python/meta").read()


def _archive(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


@FEW
@given(
    train=batch_dicts().map(lambda d: pickle.dumps(d, protocol=2)) | mutated(_valid_batch_pickle()),
)
def test_whole_loader_on_archives_with_fuzzed_members(tmp_path_factory, real_meta, train):
    path = tmp_path_factory.mktemp("fuzz") / "cifar-100-python.tar.gz"
    test = _valid_batch_pickle(1)
    path.write_bytes(_archive({"train": train, "test": test, "meta": real_meta}))
    try:
        loaded = cifar.load_cifar("cifar100", path, verify=False, progress=False)
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    assert loaded.train_images.dtype == torch.uint8 and loaded.train_images.shape[1:] == (3, 32, 32)
    assert len(loaded.train_labels) == len(loaded.train_images) and loaded.num_classes == 100


@pytest.fixture(scope="module")
def small_archive(real_meta) -> bytes:
    return _archive(
        {"train": _valid_batch_pickle(), "test": _valid_batch_pickle(1), "meta": real_meta}
    )


@FEW
@given(
    cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(1, 255)), max_size=3)
)
def test_truncated_or_damaged_archives_give_data_error(tmp_path_factory, small_archive, cut, flips):
    blob = bytearray(small_archive[: int(len(small_archive) * cut)])
    for where, xor in flips:
        if blob:
            blob[min(int(where * len(blob)), len(blob) - 1)] ^= xor
    assume(bytes(blob) != small_archive)
    path = tmp_path_factory.mktemp("fuzz") / "cifar-100-python.tar.gz"
    path.write_bytes(bytes(blob))
    try:
        cifar.load_cifar("cifar100", path, verify=False, progress=False)
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)


# --------------------------------------------------------------------------- images


@contextlib.contextmanager
def bomb_limit(pixels: int) -> Iterator[None]:
    """A low decompression-bomb limit: damaged headers that claim huge sizes stay cheap."""
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _encoded(fmt: str, **kw) -> bytes:
    rng = np.random.default_rng(1)
    img = Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8), "RGB")
    if fmt in ("GIF",):
        img = img.convert("P")
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


ENCODED = {
    fmt: _encoded(fmt) for fmt in ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "TGA")
}


def _decode_contract(source) -> None:
    with bomb_limit(1_000_000):
        try:
            img = images.open_image(source)
        except DataError as exc:
            assert "\n" not in str(exc)
            return
    assert img.mode == "RGB" and img.width > 0 and img.height > 0
    t = images.load_image(img, 32)
    assert t.dtype == torch.uint8 and t.shape == (3, 32, 32)


@FUZZ
@given(payload=st.binary(max_size=2000))
def test_random_bytes_are_not_images(payload):
    _decode_contract(payload)


@FUZZ
@given(payload=st.sampled_from(sorted(ENCODED)).flatmap(lambda fmt: mutated(ENCODED[fmt])))
def test_truncated_or_damaged_image_files(payload):
    _decode_contract(payload)


@FUZZ
@given(fmt=st.sampled_from(sorted(ENCODED)), cut=st.integers(0, 10_000))
def test_truncated_real_images(fmt, cut):
    payload = ENCODED[fmt]
    _decode_contract(payload[: cut % (len(payload) + 1)])


MODE_FORMATS = {
    "1": ["PNG", "BMP", "TIFF"],
    "L": ["PNG", "JPEG", "BMP", "TIFF", "WEBP"],
    "LA": ["PNG", "TIFF"],
    "P": ["PNG", "GIF", "BMP", "TIFF"],
    "RGB": ["PNG", "JPEG", "BMP", "TIFF", "WEBP"],
    "RGBA": ["PNG", "TIFF", "WEBP"],
    "CMYK": ["JPEG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I": ["TIFF"],
    "F": ["TIFF"],
}


@FUZZ
@given(
    mode_fmt=st.sampled_from([(m, f) for m, fs in MODE_FORMATS.items() for f in fs]),
    width=st.integers(1, 40),
    height=st.integers(1, 40),
    seed=st.integers(0, 2**16),
)
def test_every_mode_decodes_to_rgb(mode_fmt, width, height, seed):
    mode, fmt = mode_fmt
    rng = np.random.default_rng(seed)
    if mode in ("I;16", "I", "F"):
        dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
        img = Image.fromarray(rng.integers(0, 65536, (height, width)).astype(dtype))
        assert img.mode == mode
    else:
        rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8))
        img = rgba if mode == "RGBA" else rgba.convert("LA" if mode == "LA" else "RGB")
        img = img if img.mode == mode else img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, fmt)
    t = images.decode_image(buf.getvalue())
    assert t.dtype == torch.uint8 and t.shape == (3, height, width)


@FUZZ
@given(
    array=hnp.arrays(
        dtype=st.sampled_from(
            [np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_, np.complex64]
        ),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6),
    )
)
def test_arrays_become_images_or_data_error(array):
    try:
        t = images.load_image(array, 32)
    except DataError:
        return
    assert t.dtype == torch.uint8 and t.shape == (3, 32, 32)


# --------------------------------------------------------------------------- checkpoints

TINY = {"depth": 1, "dim": 16, "mlp_dim": 16, "num_heads": 2, "num_classes": 3}


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[bytes, checkpoint.Checkpoint]:
    torch.manual_seed(0)
    model = create_model("eanet-cifar", **TINY)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.zeros(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    path = tmp_path_factory.mktemp("ckpt") / "m.safetensors"
    meta = {"class_names": ["a", "b", "c"], "epoch": 1, "history": [{"epoch": 1}]}
    checkpoint.save(path, model, meta, optimizer, rng=True)
    return path.read_bytes(), checkpoint.load(path)


@FUZZ
@given(change=st.data())
def test_damaged_checkpoints_are_detected_or_harmless(tmp_path_factory, tiny_checkpoint, change):
    blob, original = tiny_checkpoint
    header_end = 8 + int.from_bytes(blob[:8], "little")
    region = change.draw(st.sampled_from(["header", "tensors", "anywhere"]))
    lo, hi = {"header": (0, header_end), "tensors": (header_end, len(blob))}.get(
        region, (0, len(blob))
    )
    damaged = bytearray(blob)
    for _ in range(change.draw(st.integers(1, 3))):
        at = change.draw(st.integers(lo, hi - 1))
        damaged[at] = change.draw(st.integers(0, 255))
    if change.draw(st.booleans()):
        del damaged[change.draw(st.integers(0, len(damaged))) :]
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    path.write_bytes(bytes(damaged))
    try:
        loaded = checkpoint.load(path)
    except CheckpointError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return
    # Loaded: then nothing that matters changed (e.g. a space in the header's padding).
    assert loaded.meta == original.meta
    for key, value in original.model_state.items():
        assert torch.equal(loaded.model_state[key], value)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 200) | st.floats() | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)
GOOD_CONFIG = ModelConfig(**TINY).to_dict()
CONFIGS = JSON | st.dictionaries(st.sampled_from(sorted(GOOD_CONFIG)), JSON, max_size=3).map(
    lambda d: {**GOOD_CONFIG, **d}
)
META = st.fixed_dictionaries(
    {},
    optional={
        "model_config": CONFIGS,
        "class_names": JSON | st.just(["a", "b", "c"]),
        "epoch": JSON,
        "history": JSON,
        "optimizer": JSON | st.fixed_dictionaries({"param_groups": JSON}),
    },
)
TENSOR_NAMES = st.sampled_from(
    ["model.head.weight", "optim.0.exp_avg", "optim.x.step", "optim..", "rng.cpu", "junk", "model."]
)


@FUZZ
@given(
    meta=META | JSON,
    names=st.lists(TENSOR_NAMES, max_size=4, unique=True),
    header=st.fixed_dictionaries(
        {"format": st.just("eanet-checkpoint") | st.text(max_size=3)},
        optional={
            "format_version": st.just("1") | st.text(max_size=2),
            "sha256": st.text(max_size=4),
        },
    ),
)
def test_checkpoints_with_random_metadata(tmp_path_factory, meta, names, header):
    path = tmp_path_factory.mktemp("fuzz") / "m.safetensors"
    tensors = {name: torch.zeros(2) for name in names}
    header = {"format_version": "1", **header, "meta": json.dumps(meta)}
    save_file(tensors, str(path), metadata=header)
    try:
        ckpt = checkpoint.load(path)
    except CheckpointError as exc:
        assert "\n" not in str(exc)
        return
    assert isinstance(ckpt.model_config, ModelConfig)
    assert len(ckpt.class_names) == ckpt.model_config.num_classes
