"""Tests for eanet.data: the shipped CIFAR-100 slice, corrupt inputs, downloads and helpers."""

from __future__ import annotations

import dataclasses
import io
import math
import os
import pickle
import re
import shutil
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from eanet.data import cifar
from eanet.data.cifar import CIFAR10, CIFAR100, DATASETS, SAMPLE_ARCHIVE, SAMPLE_MD5, load_cifar
from eanet.data.dataset import ImageData
from eanet.data.download import default_cache_dir, download, md5sum
from eanet.data.load import load_dataset
from eanet.data.splits import compute_normalization, split_validation
from eanet.errors import ConfigError, DataError

N_TRAIN, N_TEST = 486, 916


@pytest.fixture(scope="module")
def sample() -> ImageData:
    return load_cifar("cifar100", SAMPLE_ARCHIVE, md5=SAMPLE_MD5, progress=False)


@pytest.fixture(scope="module")
def raw_members() -> dict[str, dict]:
    """The sample's pickles loaded the plain way (trusted file) for cross-checking."""
    with tarfile.open(SAMPLE_ARCHIVE) as tar:
        return {
            m: pickle.load(tar.extractfile(f"cifar-100-python/{m}"), encoding="latin1")
            for m in ("train", "test", "meta")
        }


def _pickle(obj: object) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


def _cifar100_members(raw: dict[str, dict], **overrides: bytes | None) -> dict[str, bytes]:
    """A small valid CIFAR-100 archive layout (real meta, tiny batches), with members replaced."""
    defaults = {"train": _batch(4), "test": _batch(3), "meta": raw["meta"]}
    members = {
        f"cifar-100-python/{m}": overrides.get(m, _pickle(obj)) for m, obj in defaults.items()
    }
    return {k: v for k, v in members.items() if v is not None}


def _batch(n: int, labels: list[int] | None = None, **extra: object) -> dict:
    rng = np.random.default_rng(n)
    batch = {
        "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        "fine_labels": labels if labels is not None else [i % 100 for i in range(n)],
    }
    batch.update(extra)
    return batch


# --------------------------------------------------------------------------- the shipped slice


def test_sample_md5() -> None:
    assert md5sum(SAMPLE_ARCHIVE, chunk=4096) == SAMPLE_MD5


def test_load_sample_shapes_and_labels(sample: ImageData) -> None:
    assert sample.name == "cifar100"
    assert sample.num_classes == 100
    assert sample.train_images.shape == (N_TRAIN, 3, 32, 32)
    assert sample.test_images.shape == (N_TEST, 3, 32, 32)
    for images in (sample.train_images, sample.test_images):
        assert images.dtype == torch.uint8 and images.is_contiguous()
    for labels in (sample.train_labels, sample.test_labels):
        assert labels.dtype == torch.int64
        assert int(labels.min()) >= 0 and int(labels.max()) < 100
    assert sample.train_labels.shape == (N_TRAIN,) and sample.test_labels.shape == (N_TEST,)
    assert sample.class_names[0] == "apple" and sample.class_names[-1] == "worm"
    assert len(set(sample.test_labels.tolist())) == 100
    assert len(set(sample.train_labels.tolist())) == 99


def test_sample_first_images_are_cattle_and_mountain(sample: ImageData) -> None:
    assert int(sample.train_labels[0]) == 19
    assert sample.class_names[19] == "cattle"
    assert int(sample.test_labels[0]) == 49
    assert sample.class_names[49] == "mountain"


def test_pixel_layout_is_channel_planes_row_major(sample: ImageData, raw_members: dict) -> None:
    row = raw_members["train"]["data"][0]
    image = sample.train_images[0].numpy()
    np.testing.assert_array_equal(image[0].ravel(), row[:1024])
    np.testing.assert_array_equal(image[1].ravel(), row[1024:2048])
    np.testing.assert_array_equal(image[2, 5, 7], row[2048 + 5 * 32 + 7])
    np.testing.assert_array_equal(
        sample.test_labels.numpy(), np.asarray(raw_members["test"]["fine_labels"])
    )


def test_load_sample_without_verify_matches(sample: ImageData) -> None:
    other = load_cifar("cifar100", str(SAMPLE_ARCHIVE), verify=False, progress=False)
    assert other.class_names == sample.class_names
    assert torch.equal(other.train_images, sample.train_images)
    assert torch.equal(other.test_labels, sample.test_labels)


def test_load_emits_no_numpy_deprecation_warning() -> None:
    cifar._allowed_globals.cache_clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_cifar("cifar100", SAMPLE_ARCHIVE, verify=False, progress=False)


def test_load_dataset_dispatch(sample: ImageData) -> None:
    loaded = load_dataset("cifar100", SAMPLE_ARCHIVE, md5=SAMPLE_MD5, progress=False)
    assert torch.equal(loaded.test_images, sample.test_images)
    assert set(DATASETS) == {"cifar100", "cifar10"}


def test_load_dataset_unknown_name_lists_choices() -> None:
    with pytest.raises(DataError, match=r"imagenet.*cifar10, cifar100"):
        load_dataset("imagenet")


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("extracted")
    with tarfile.open(SAMPLE_ARCHIVE) as tar:
        tar.extractall(root, filter="data")
    return root


@pytest.mark.parametrize("which", ["folder", "parent"])
def test_load_extracted(
    extracted: Path, sample: ImageData, which: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = extracted / "cifar-100-python" if which == "folder" else extracted
    with caplog.at_level("INFO", logger="eanet.data"):
        loaded = load_cifar("cifar100", path, progress=False)
    assert torch.equal(loaded.train_images, sample.train_images)
    assert loaded.class_names == sample.class_names
    assert "trusted" in caplog.text


def test_extracted_folder_missing_member(extracted: Path, tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    shutil.copytree(extracted / "cifar-100-python", folder)
    (folder / "meta").unlink()
    with pytest.raises(DataError, match=re.escape(str(folder / "meta"))):
        load_cifar("cifar100", folder)


@pytest.mark.parametrize("layout", ["train/apple", "apple"])
def test_a_folder_of_class_folders_points_to_dataset_folder(tmp_path: Path, layout: str) -> None:
    (tmp_path / layout).mkdir(parents=True)  # as `eanet sample-images` writes, or one level
    with pytest.raises(DataError) as info:
        load_cifar("cifar100", tmp_path)
    message = str(info.value)
    assert message.endswith("add --dataset folder") and "\n" not in message
    if layout == "train/apple":
        assert message.startswith(f"{tmp_path / 'train'} is a folder, not the cifar100 file")


def test_directory_holding_the_archive_is_verified(tmp_path: Path) -> None:
    shutil.copy(SAMPLE_ARCHIVE, tmp_path / "cifar-100-python.tar.gz")
    with pytest.raises(DataError, match="--md5"):
        load_cifar("cifar100", tmp_path)
    loaded = load_cifar("cifar100", tmp_path, md5=SAMPLE_MD5, progress=False)
    assert loaded.train_images.shape[0] == N_TRAIN


def test_empty_directory_says_what_it_wants(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"cifar-100-python\.tar\.gz"):
        load_cifar("cifar100", tmp_path)


def test_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.tar.gz"
    with pytest.raises(DataError, match=re.escape(str(missing))):
        load_cifar("cifar100", missing)


def test_official_md5_rejects_the_slice() -> None:
    with pytest.raises(DataError) as info:
        load_cifar("cifar100", SAMPLE_ARCHIVE)
    message = str(info.value)
    assert SAMPLE_MD5 in message and CIFAR100.md5 in message and "--md5" in message
    assert str(SAMPLE_ARCHIVE) in message and "\n" not in message


def test_wrong_caller_md5_is_rejected() -> None:
    with pytest.raises(DataError, match="0" * 32):
        load_cifar("cifar100", SAMPLE_ARCHIVE, md5="0" * 32)


# --------------------------------------------------------------------------- corrupt inputs


def test_truncated_archive(tmp_path: Path) -> None:
    blob = SAMPLE_ARCHIVE.read_bytes()
    path = tmp_path / "truncated.tar.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=re.escape(str(path))):
        load_cifar("cifar100", path, verify=False)


def test_garbage_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.tar.gz"
    path.write_bytes(os.urandom(5000))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*archive"):
        load_cifar("cifar100", path, verify=False)


def test_archive_without_train(tmp_path: Path, raw_members: dict) -> None:
    path = _write_tar(tmp_path / "a.tar.gz", _cifar100_members(raw_members, train=None))
    with pytest.raises(DataError, match=re.escape(str(path)) + ".*cifar-100-python/train"):
        load_cifar("cifar100", path, verify=False)


def _load_with(tmp_path: Path, raw: dict, **overrides: bytes) -> ImageData:
    path = _write_tar(tmp_path / "bad.tar.gz", _cifar100_members(raw, **overrides))
    return load_cifar("cifar100", path, verify=False, progress=False)


def test_rebuilt_archive_loads(tmp_path: Path, raw_members: dict) -> None:
    """The helper itself builds a valid archive, so the failures below are the overrides'."""
    loaded = _load_with(tmp_path, raw_members)
    assert loaded.train_images.shape == (4, 3, 32, 32) and loaded.test_images.shape[0] == 3
    assert loaded.class_names[19] == "cattle"


@pytest.mark.parametrize(
    ("batch", "pattern"),
    [
        ({"data": np.zeros((2, 3072), np.uint8)}, "no key 'fine_labels'"),
        (_batch(2, data=np.zeros((2, 3072), np.float32)), "float32"),
        (_batch(2, data=np.zeros((2, 100), np.uint8)), r"\(2, 100\)"),
        (_batch(2, data=np.zeros((2, 3, 32, 32), np.uint8)), "uint8 \\[N, 3072\\]"),
        (_batch(2, labels=[0, 100]), "outside 0..99"),
        (_batch(2, labels=[-1, 3]), "outside 0..99"),
        (_batch(2, labels=[1, 2, 3]), "3 labels for 2 images"),
        (_batch(2, labels=["a", "b"]), "not a list of integers"),
        ([1, 2, 3], "holds a list"),
    ],
)
def test_bad_train_pickle(tmp_path: Path, raw_members: dict, batch: object, pattern: str) -> None:
    with pytest.raises(DataError, match=r"bad\.tar\.gz.*member cifar-100-python/train.*" + pattern):
        _load_with(tmp_path, raw_members, train=_pickle(batch))


def test_bad_meta(tmp_path: Path, raw_members: dict) -> None:
    meta = {"fine_label_names": ["a", "b"]}
    with pytest.raises(DataError, match=r"member cifar-100-python/meta.*2 entries, not 100"):
        _load_with(tmp_path, raw_members, meta=_pickle(meta))


def test_corrupt_pickle_bytes(tmp_path: Path, raw_members: dict) -> None:
    payload = _pickle(_batch(3))[:-40]
    with pytest.raises(DataError, match=r"member cifar-100-python/train.*cannot unpickle"):
        _load_with(tmp_path, raw_members, train=payload)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused(tmp_path: Path, raw_members: dict) -> None:
    marker = tmp_path / "pwned"
    payload = _pickle({"data": _Exploit(marker), "fine_labels": [0]})
    with pytest.raises(DataError, match=r"member cifar-100-python/train.*system.*refusing"):
        _load_with(tmp_path, raw_members, train=payload)
    assert not marker.exists()


def test_malicious_pickle_in_folder(tmp_path: Path, extracted: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    shutil.copytree(extracted / "cifar-100-python", folder)
    (folder / "test").write_bytes(_pickle({"x": _Exploit(tmp_path / "pwned")}))
    with pytest.raises(DataError, match=re.escape(str(folder / "test")) + ".*refusing"):
        load_cifar("cifar100", tmp_path)
    assert not (tmp_path / "pwned").exists()


def test_codecs_encode_only_for_latin1(tmp_path: Path, raw_members: dict) -> None:
    # Python 3 protocol-2 pickles spell bytes as _codecs.encode(text, "latin1"); other codecs are
    # refused even though _codecs.encode itself is allowed.
    batch = _batch(2, filenames=[b"a.png", b"b.png"])
    _load_with(tmp_path, raw_members, train=_pickle(batch))
    evil = _pickle(batch).replace(b"latin1", b"rot_13")
    with pytest.raises(DataError, match="cannot unpickle"):
        _load_with(tmp_path, raw_members, train=evil)


# --------------------------------------------------------------------------- download


def test_download_file_url(tmp_path: Path) -> None:
    dest = tmp_path / "out" / "cifar.tar.gz"
    result = download(SAMPLE_ARCHIVE.as_uri(), dest, SAMPLE_MD5, progress=False)
    assert result == dest
    assert dest.read_bytes() == SAMPLE_ARCHIVE.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["cifar.tar.gz"]


def test_download_without_md5(tmp_path: Path) -> None:
    dest = tmp_path / "x.tar.gz"
    download(SAMPLE_ARCHIVE.as_uri(), dest, None, progress=False)
    assert md5sum(dest) == SAMPLE_MD5


def test_download_wrong_md5_leaves_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "cifar.tar.gz"
    with pytest.raises(DataError, match=r"md5.*" + CIFAR100.md5):
        download(SAMPLE_ARCHIVE.as_uri(), dest, CIFAR100.md5, progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/x.tar.gz", "file:///nonexistent/x.tar.gz"])
def test_download_unreachable(tmp_path: Path, url: str) -> None:
    dest = tmp_path / "x.tar.gz"
    with pytest.raises(DataError, match=r"by hand.*" + re.escape(str(dest))):
        download(url, dest, None, progress=False)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the cache


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EANET_DATA", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("EANET_DATA")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path / ".cache" / "eanet"


def test_cached_file_with_wrong_md5(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EANET_DATA", str(tmp_path))
    shutil.copy(SAMPLE_ARCHIVE, tmp_path / CIFAR100.filename)
    with pytest.raises(DataError, match=r"md5.*cached file is corrupt"):
        load_cifar("cifar100")


def test_empty_cache_without_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EANET_DATA", str(tmp_path))
    expected = re.escape(str(tmp_path / CIFAR100.filename))
    with pytest.raises(DataError, match=expected + ".*by hand"):
        load_cifar("cifar100", download=False)


def test_cache_downloads_then_reuses(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("EANET_DATA", str(tmp_path / "cache"))
    spec = dataclasses.replace(CIFAR100, url=SAMPLE_ARCHIVE.as_uri(), md5=SAMPLE_MD5)
    monkeypatch.setitem(cifar.DATASETS, "cifar100", spec)
    first = load_cifar("cifar100", progress=False)
    assert (tmp_path / "cache" / CIFAR100.filename).is_file()
    second = load_cifar("cifar100", download=False, progress=False)
    assert torch.equal(first.train_images, second.train_images)


# --------------------------------------------------------------------------- CIFAR-10


def _cifar10_archive(path: Path) -> Path:
    names = ["airplane", "automobile", "bird", "cat", "deer"]
    names += ["dog", "frog", "horse", "ship", "truck"]
    members = {"cifar-10-batches-py/batches.meta": _pickle({"label_names": names})}
    for i in range(1, 6):
        batch = {"data": np.full((2, 3072), i, np.uint8), "labels": [i, 9 - i]}
        members[f"cifar-10-batches-py/data_batch_{i}"] = _pickle(batch)
    test = {"data": np.arange(3 * 3072, dtype=np.uint32).astype(np.uint8).reshape(3, 3072)}
    test["labels"] = [0, 1, 2]
    members["cifar-10-batches-py/test_batch"] = _pickle(test)
    return _write_tar(path, members)


def test_cifar10_archive(tmp_path: Path) -> None:
    path = _cifar10_archive(tmp_path / "c10.tar.gz")
    with pytest.raises(DataError, match=CIFAR10.md5):
        load_cifar("cifar10", path)
    loaded = load_cifar("cifar10", path, md5=md5sum(path), progress=False)
    again = load_cifar("cifar10", path, verify=False, progress=False)
    assert torch.equal(loaded.train_images, again.train_images)
    assert loaded.name == "cifar10" and loaded.num_classes == 10
    assert loaded.class_names[0] == "airplane" and loaded.class_names[-1] == "truck"
    assert loaded.train_images.shape == (10, 3, 32, 32) and loaded.test_images.shape[0] == 3
    # batches are concatenated in order data_batch_1..5
    assert loaded.train_labels.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    assert loaded.train_images[:, 0, 0, 0].tolist() == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    assert loaded.test_images[1, 0, 0, 0] == 3072 % 256


def test_cifar10_extracted_parent(tmp_path: Path) -> None:
    path = _cifar10_archive(tmp_path / "c10.tar.gz")
    with tarfile.open(path) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    loaded = load_dataset("cifar10", tmp_path / "x", progress=False)
    assert loaded.train_images.shape == (10, 3, 32, 32)


def test_cifar10_missing_batch(tmp_path: Path) -> None:
    path = _cifar10_archive(tmp_path / "c10.tar.gz")
    root = tmp_path / "x"
    with tarfile.open(path) as tar:
        tar.extractall(root, filter="data")
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar("cifar10", root)


# --------------------------------------------------------------------------- helpers


def test_split_validation_takes_the_tail() -> None:
    images = torch.arange(10).view(10, 1, 1, 1).expand(10, 3, 2, 2).to(torch.uint8)
    labels = torch.arange(10)
    tr_x, tr_y, va_x, va_y = split_validation(images, labels, 0.2)
    assert tr_y.tolist() == list(range(8)) and va_y.tolist() == [8, 9]
    assert tr_x[:, 0, 0, 0].tolist() == list(range(8)) and va_x[:, 0, 0, 0].tolist() == [8, 9]


def test_split_validation_zero() -> None:
    images = torch.zeros(5, 3, 4, 4, dtype=torch.uint8)
    tr_x, tr_y, va_x, va_y = split_validation(images, torch.arange(5), 0.0)
    assert tr_x.shape == (5, 3, 4, 4) and tr_y.shape == (5,)
    assert va_x.shape == (0, 3, 4, 4) and va_y.shape == (0,)


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_split_validation_bad_fraction(fraction: float) -> None:
    with pytest.raises(ConfigError, match="fraction"):
        split_validation(torch.zeros(4, 3, 2, 2), torch.zeros(4), fraction)


@settings(max_examples=50, deadline=None)
@given(n=st.integers(0, 60), fraction=st.floats(0.0, 1.0, exclude_max=True))
def test_split_validation_property(n: int, fraction: float) -> None:
    labels = torch.arange(n)
    tr_x, tr_y, va_x, va_y = split_validation(labels.view(n, 1), labels, fraction)
    assert len(tr_y) == math.floor(n * (1.0 - fraction))  # Keras's train_validation_split
    assert torch.equal(torch.cat([tr_y, va_y]), labels)
    assert torch.equal(tr_x.view(-1), tr_y) and torch.equal(va_x.view(-1), va_y)


def test_compute_normalization_matches_numpy(sample: ImageData) -> None:
    array = sample.train_images.numpy().astype(np.float64)
    mean, var, count = compute_normalization(sample.train_images, batch=100)
    assert mean.dtype == torch.float32 and var.dtype == torch.float32 and mean.shape == (3,)
    assert count == N_TRAIN * 32 * 32
    np.testing.assert_allclose(mean.numpy(), array.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(var.numpy(), array.var(axis=(0, 2, 3)), rtol=1e-5)
    mean_all, var_all, _ = compute_normalization(sample.train_images)
    assert torch.equal(mean, mean_all) and torch.equal(var, var_all)


def test_compute_normalization_rejects_empty() -> None:
    with pytest.raises(DataError, match="empty"):
        compute_normalization(torch.zeros(0, 3, 32, 32, dtype=torch.uint8))
