"""Keras import: the committed fixture (made by tools/make_keras_fixture.py with Keras 3.15.1)
must be reproduced without Keras, and a wrong mapping must be caught by the same tolerance."""

from __future__ import annotations

import dataclasses
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from keras_helpers import FILES, FIXTURE, fixture_pixels, load_fixture, prob_difference
from keras_helpers import FORWARD_TOLERANCE as TOLERANCE

from eanet import accel, checkpoint, cli
from eanet.errors import CheckpointError, ConfigError
from eanet.interop import keras as K
from eanet.models.registry import count_parameters

h5py = pytest.importorskip("h5py")


@pytest.fixture(scope="module")
def expected() -> dict[str, np.ndarray]:
    return load_fixture("expected.npz")


@pytest.fixture(scope="module")
def pixels(expected) -> torch.Tensor:
    return fixture_pixels(expected)


@pytest.fixture(scope="module")
def keras_models() -> dict[str, K.KerasModel]:
    return {name: K.read_keras_model(FIXTURE / name) for name in FILES}


@pytest.mark.parametrize("name", list(FILES))
def test_import_matches_keras_probabilities(name, keras_models, expected, pixels):
    key, attention, params = FILES[name]
    km = keras_models[name]
    assert km.config.attention == attention
    assert (km.config.depth, km.config.num_classes, km.config.dim) == (8, 100, 64)
    assert km.container == (".keras" if name.endswith(".keras") else ".weights.h5")
    model = K.to_torch(km)
    assert count_parameters(model) == params
    diff = prob_difference(km, pixels, expected[key])
    assert diff <= TOLERANCE, f"{name}: max |prob diff| vs Keras {diff:.2e}"
    accel.apply(model, "cpu")  # the faster equivalents compute the same function
    diff = prob_difference(model, pixels, expected[key])
    assert diff <= TOLERANCE, f"{name}, eanet.accel applied: max |prob diff| vs Keras {diff:.2e}"
    # The outputs are far from uniform, so the comparison has something to see.
    assert expected[key].max(axis=1).min() > 0.2


def test_normalization_statistics_are_imported(keras_models):
    with h5py.File(FIXTURE / "eanet.weights.h5") as f:
        group = f["layers/sequential/layers/normalization/vars"]
        mean, var, count = group["0"][()], group["1"][()], group["2"][()]
    model = K.to_torch(keras_models["eanet.weights.h5"])
    assert np.array_equal(model.normalize.mean.numpy(), mean)
    assert np.array_equal(model.normalize.var.numpy(), var)
    assert int(model.normalize.count) == int(count) == 486 * 32 * 32


def _swap(state: dict, a: str, b: str) -> dict:
    state = dict(state)
    state[a], state[b] = state[b], state[a]
    return state


def _key_major_heads(state: dict) -> dict:
    """ViT q/k/v flattened (key_dim, heads) instead of Keras's head-major (heads, key_dim)."""
    state = dict(state)
    for n in "qkv":
        w, b = state[f"blocks.2.attn.{n}.weight"], state[f"blocks.2.attn.{n}.bias"]
        state[f"blocks.2.attn.{n}.weight"] = (
            w.reshape(4, 64, 64).transpose(1, 0, 2).reshape(256, 64)
        )
        state[f"blocks.2.attn.{n}.bias"] = b.reshape(4, 64).T.reshape(-1)
    return state


def _neutral_variance(state: dict) -> dict:
    return {**state, "normalize.var": np.full(3, state["normalize.var"].mean(), np.float32)}


WRONG = {
    "erf-gelu": lambda km: dataclasses.replace(
        km, config=dataclasses.replace(km.config, gelu="erf")
    ),
    "swap-mlp-dense": lambda km: dataclasses.replace(
        km, state=_swap(km.state, "blocks.5.mlp.fc1.weight", "blocks.5.mlp.fc2.weight")
    ),
    "per-channel-variance-lost": lambda km: dataclasses.replace(
        km, state=_neutral_variance(km.state)
    ),
}
WRONG_EANET = {
    "swap-memories": lambda km: dataclasses.replace(
        km, state=_swap(km.state, "blocks.3.attn.mk.weight", "blocks.3.attn.mv.weight")
    ),
}
WRONG_VIT = {
    "swap-query-key": lambda km: dataclasses.replace(
        km, state=_swap(km.state, "blocks.3.attn.q.weight", "blocks.3.attn.k.weight")
    ),
    "key-major-heads": lambda km: dataclasses.replace(km, state=_key_major_heads(km.state)),
}
CASES = [("eanet.weights.h5", w) for w in {**WRONG, **WRONG_EANET}] + [
    ("vit.weights.h5", w) for w in {**WRONG, **WRONG_VIT}
]


@pytest.mark.parametrize(("name", "wrong"), CASES)
def test_a_wrong_mapping_exceeds_the_tolerance(name, wrong, keras_models, expected, pixels):
    km = {**WRONG, **WRONG_EANET, **WRONG_VIT}[wrong](keras_models[name])
    diff = prob_difference(km, pixels, expected[FILES[name][0]])
    assert diff > TOLERANCE, f"{wrong} on {name} moves the probabilities only {diff:.2e}"


def test_layer_groups_sort_numerically():
    layers = K._Layers(Path("x"), {f"dense_{i}" if i else "dense": {} for i in (10, 2, 0, 1)})
    assert layers.numbered("dense") == ["dense", "dense_1", "dense_2", "dense_10"]


# --------------------------------------------------------------------------- CLI and files


def test_cli_import_writes_a_checkpoint_with_cifar100_names(tmp_path, capsys, expected, pixels):
    out = tmp_path / "imported"
    assert cli.main(["import-keras", str(FIXTURE / "vit.weights.h5"), str(out)]) == 0
    assert "imported Keras ViT (8 blocks, 100 classes, 623,268 params" in capsys.readouterr().out
    model, ckpt = checkpoint.load_model(out)
    assert ckpt.class_names[:3] == ["apple", "aquarium_fish", "baby"]
    assert len(ckpt.class_names) == 100
    assert ckpt.meta.source["container"] == ".weights.h5"
    with torch.no_grad():
        probs = model(pixels).softmax(dim=-1).numpy()
    assert np.abs(probs - expected["vit_probs"]).max() <= TOLERANCE
    assert cli.main(["import-keras", str(FIXTURE / "vit.weights.h5"), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_import_never_replaces_a_training_runs_checkpoint_or_its_source(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / checkpoint.CHECKPOINT_NAME).read_bytes()
    h5 = FIXTURE / "vit.weights.h5"
    assert cli.main(["import-keras", str(h5), str(run), "--overwrite"]) == 2
    assert "is the checkpoint.safetensors of the run" in capsys.readouterr().err
    assert (run / checkpoint.CHECKPOINT_NAME).read_bytes() == before
    source = tmp_path / "vit.safetensors"  # a Keras file under a checkpoint's name
    shutil.copy(h5, source)
    assert cli.main(["import-keras", str(source), str(source), "--overwrite"]) == 2
    assert "is the input" in capsys.readouterr().err
    assert source.read_bytes() == h5.read_bytes()


@pytest.fixture
def ten_class_file(tmp_path) -> Path:
    """The EANet fixture with its head cut to 10 classes."""
    path = tmp_path / "ten.weights.h5"
    shutil.copy(FIXTURE / "eanet.weights.h5", path)
    with h5py.File(path, "r+") as f:
        for i in (0, 1):
            data = f[f"layers/dense_48/vars/{i}"][()]
            del f[f"layers/dense_48/vars/{i}"]
            f[f"layers/dense_48/vars/{i}"] = data[..., :10]
    return path


def test_other_class_counts_need_class_names(ten_class_file, tmp_path, capsys):
    out = tmp_path / "ten.safetensors"
    assert cli.main(["import-keras", str(ten_class_file), str(out)]) == 2
    err = capsys.readouterr().err
    assert "10 classes" in err and "--class-names" in err and not out.exists()
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class {i}" for i in range(9)) + "\n")
    assert cli.main(["import-keras", str(ten_class_file), str(out), "--class-names", str(names)])
    assert "9 class names" in capsys.readouterr().err
    names.write_text("\n".join(f"class {i}" for i in range(10)) + "\n\n")
    args = ["import-keras", str(ten_class_file), str(out), "--class-names", str(names)]
    assert cli.main(args) == 0
    assert checkpoint.load(out).class_names == [f"class {i}" for i in range(10)]


def _truncated(tmp_path: Path) -> Path:
    path = tmp_path / "truncated.weights.h5"
    path.write_bytes((FIXTURE / "eanet.weights.h5").read_bytes()[:300_000])
    return path


def _unrelated(tmp_path: Path) -> Path:
    path = tmp_path / "conv.weights.h5"
    with h5py.File(path, "w") as f:
        f["layers/conv2d/vars/0"] = np.zeros((3, 3, 3, 8), np.float32)
    return path


def _not_h5(tmp_path: Path) -> Path:
    path = tmp_path / "notes.weights.h5"
    path.write_text("not weights\n")
    return path


def _zip_without_weights(tmp_path: Path) -> Path:
    path = tmp_path / "empty.keras"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("config.json", "{}")
    return path


def _missing_bias(tmp_path: Path) -> Path:
    path = tmp_path / "nobias.weights.h5"
    shutil.copy(FIXTURE / "vit.weights.h5", path)
    with h5py.File(path, "r+") as f:
        del f["layers/multi_head_attention_3/key_dense/vars/1"]
    return path


def _extra_block_dense(tmp_path: Path) -> Path:
    path = tmp_path / "extra.weights.h5"
    shutil.copy(FIXTURE / "eanet.weights.h5", path)
    with h5py.File(path, "r+") as f:
        f["layers/dense_49/vars/0"] = np.zeros((100, 100), np.float32)
        f["layers/dense_49/vars/1"] = np.zeros(100, np.float32)
    return path


BAD = {
    "truncated": (_truncated, "truncated"),
    "unrelated": (_unrelated, "conv2d"),
    "not-h5": (_not_h5, "not a readable Keras weights file"),
    "zip-without-weights": (_zip_without_weights, "model.weights.h5"),
    "missing-bias": (_missing_bias, "multi_head_attention_3/key_dense/vars/1"),
    "extra-dense": (_extra_block_dense, "Dense layers"),
    "missing-file": (lambda tmp: tmp / "absent.keras", "no such file"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_files_are_one_line_errors(case, tmp_path, capsys):
    make, words = BAD[case]
    source = make(tmp_path)
    with pytest.raises(CheckpointError) as info:
        K.read_keras_model(source)
    assert words in str(info.value) and "\n" not in str(info.value)
    out = tmp_path / "out"
    assert cli.main(["import-keras", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eanet: error: ") and err.count("\n") == 1
    assert "Traceback" not in err and not out.exists()


def test_missing_h5py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ConfigError, match=r"eanet\[keras\]"):
        K.read_keras_model(FIXTURE / "eanet.weights.h5")


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["cat", "dog", "cat"], "class name 'cat' (name 3) repeats name 1; "),
        (["caf\u00e9", "cafe\u0301"], "repeats name 1 in another Unicode form"),
    ],
)
def test_repeated_class_names_are_a_one_line_error(tmp_path, capsys, names, message):
    path = tmp_path / "names.txt"
    path.write_text("\n".join(names) + "\n", encoding="utf-8")
    with pytest.raises(K.DataError, match=re.escape(message)):
        K.read_class_names(path)
    out = tmp_path / "x.safetensors"
    args = ["import-keras", str(FIXTURE / "eanet.weights.h5"), str(out), "--class-names", str(path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and not out.exists()


# --------------------------------------------------------------------------- hostile files

HEAD_BIAS = "layers/dense_48/vars/1"  # the EANet fixture's head bias, (100,) float32
HEAD_KERNEL = "layers/dense_48/vars/0"  # (64, 100)


def _with(tmp_path: Path, name: str, make) -> Path:
    """The EANet fixture with dataset `name` replaced by what `make(f, tmp_path)` puts there."""
    path = tmp_path / "hostile.weights.h5"
    shutil.copy(FIXTURE / "eanet.weights.h5", path)
    with h5py.File(path, "r+") as f:
        del f[name]
        make(f, name, tmp_path)
    return path


def _secret(tmp_path: Path) -> Path:
    """A local file a crafted weights file would exfiltrate: 100 float32s of marker bytes."""
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"SECRETKEY=hunter2;" * 22 + b"END!")  # 400 bytes
    return secret


def _external_storage(f, name, tmp):
    f.create_dataset(name, (100,), "<f4", external=[(str(_secret(tmp)), 0, 400)])


def _soft_link(f, name, tmp):
    f["hidden"] = np.ones(100, np.float32)
    f[name] = h5py.SoftLink("/hidden")


def _external_link(f, name, tmp):
    other = tmp / "other.h5"
    with h5py.File(other, "w") as g:
        g["data"] = np.frombuffer(_secret(tmp).read_bytes(), np.float32)
    f[name] = h5py.ExternalLink(str(other), "/data")


def _virtual(f, name, tmp):
    other = tmp / "other.h5"
    with h5py.File(other, "w") as g:
        g["data"] = np.frombuffer(_secret(tmp).read_bytes(), np.float32)
    layout = h5py.VirtualLayout((100,), "<f4")
    layout[:] = h5py.VirtualSource(str(other), "data", shape=(100,))
    f.create_virtual_dataset(name, layout)


def _huge_unwritten(f, name, tmp):  # a few KB on disk, 2**46 float32s when read
    f.create_dataset(name, (64, 2**40), "<f4", chunks=(1, 4096), compression="gzip")


def _claims_more_classes(f, name, tmp):  # 256 MB when read; the bias still says 100
    f.create_dataset(name, (64, 1_000_000), "<f4", chunks=(1, 4096), compression="gzip")


def _strings(f, name, tmp):
    f[name] = np.array([b"x" * 8] * 100)


HOSTILE = {
    "external-storage": (HEAD_BIAS, _external_storage, "HDF5 external storage"),
    "soft-link": (HEAD_BIAS, _soft_link, "is a soft link"),
    "external-link": (HEAD_BIAS, _external_link, "is an external link"),
    "virtual-dataset": (HEAD_BIAS, _virtual, "is a virtual dataset"),
    "huge-shape": (HEAD_KERNEL, _huge_unwritten, "has shape (64, 1099511627776)"),
    "wrong-shape": (HEAD_KERNEL, _claims_more_classes, "shapes do not fit the model"),
    "strings": (HEAD_BIAS, _strings, "values, not numbers"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_weight_files_are_refused_before_reading(case, tmp_path, capsys, monkeypatch):
    """External storage, links and virtual datasets would put other files' bytes into the
    checkpoint; shapes and dtypes are checked before any tensor is read (a few-KB file
    claiming terabytes is refused at once); each refusal is one line and exit status 2."""
    name, make, words = HOSTILE[case]
    source = _with(tmp_path, name, make)
    assert source.stat().st_size < 2_000_000
    reads = []
    original = h5py.Dataset.__getitem__
    monkeypatch.setattr(
        h5py.Dataset, "__getitem__", lambda ds, key: reads.append(ds.name) or original(ds, key)
    )
    with pytest.raises(CheckpointError) as info:
        K.read_keras_model(source)
    message = str(info.value)
    assert words in message and str(source) in message and "\n" not in message
    if case in ("huge-shape", "wrong-shape"):
        assert reads == []  # refused from the shapes alone
    out = tmp_path / "out.safetensors"
    assert cli.main(["import-keras", str(source), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("eanet: error: ") and err.count("\n") == 1 and words in err
    assert "Traceback" not in err and not out.exists()


def test_only_the_tensors_the_model_needs_are_read(monkeypatch):
    reads = []
    original = h5py.Dataset.__getitem__
    monkeypatch.setattr(
        h5py.Dataset, "__getitem__", lambda ds, key: reads.append(ds.name) or original(ds, key)
    )
    K.read_keras_model(FIXTURE / "eanet.weights.h5")
    state = K.read_keras_model(FIXTURE / "eanet.weights.h5").state
    assert len(reads) == 2 * len(state)  # two imports, one read per mapped tensor
    assert all(r.startswith("/layers/") for r in reads)


def test_weights_over_the_byte_bound_are_refused(monkeypatch):
    monkeypatch.setattr(K, "MAX_BYTES", 100_000)  # the fixture's tensors: 1.4 MB
    with pytest.raises(CheckpointError, match=r"its weights hold 1,445,.* more than eanet"):
        K.read_keras_model(FIXTURE / "eanet.weights.h5")


def test_too_many_objects_are_refused(monkeypatch):
    monkeypatch.setattr(K, "MAX_OBJECTS", 50)
    with pytest.raises(CheckpointError, match="holds more than 50 objects"):
        K.read_keras_model(FIXTURE / "eanet.weights.h5")


def test_a_keras_zip_bomb_is_refused_before_unpacking(tmp_path, monkeypatch, capsys):
    """A weights member that unpacks far beyond the bound (here 24 MB of zeros in a ~25 KB
    zip, with the bound lowered to 4 MB) is refused from its declared size, before anything
    is decompressed."""
    bomb = tmp_path / "bomb.keras"
    with (
        zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as z,
        z.open(K.WEIGHTS_MEMBER, "w") as member,
    ):
        for _ in range(24):
            member.write(bytes(1 << 20))
    assert bomb.stat().st_size < 100_000
    monkeypatch.setattr(K, "MAX_BYTES", 4 << 20)
    opened = []
    monkeypatch.setattr(zipfile.ZipFile, "open", lambda *a, **k: opened.append(a) or 1 / 0)
    with pytest.raises(CheckpointError, match=r"model.weights.h5 unpacks to 25,165,824 bytes"):
        K.read_keras_model(bomb)
    assert opened == []  # refused before decompressing anything
    monkeypatch.undo()
    monkeypatch.setattr(K, "MAX_BYTES", 4 << 20)
    out = tmp_path / "out.safetensors"
    assert cli.main(["import-keras", str(bomb), str(out)]) == 2
    err = capsys.readouterr().err
    assert "unpacks to 25,165,824 bytes" in err and err.count("\n") == 1 and not out.exists()
