"""Folder data sets of real images: layouts, split, cache, skipped files, errors, training."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from eanet.data.folders import load_folder, write_image_folder
from eanet.data.load import load_dataset
from eanet.errors import ConfigError, DataError
from eanet.train.config import TrainConfig
from eanet.train.loop import fit

FOLDER_CLASSES = ["apple", "bicycle", "cloud"]  # the image_folder fixture's classes


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EANET_DATA", str(tmp_path / "cache"))


def _flat(src, dst):
    """The split layout's images as DIR/CLASS/*.png (train and test pooled)."""
    for path in sorted(src.rglob("*.png")):
        split, cls, name = path.relative_to(src).parts
        (dst / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, dst / cls / f"{split}-{name}")
    return dst


def _pixels(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)


def test_split_layout_uses_train_and_test_as_they_are(image_folder, sample_data):
    data = load_folder(image_folder, progress=False)
    assert data.class_names == FOLDER_CLASSES and data.name.startswith("folder:")
    n_train = len(list((image_folder / "train").rglob("*.png")))
    n_test = len(list((image_folder / "test").rglob("*.png")))
    assert (len(data.train_labels), len(data.test_labels)) == (n_train, n_test)
    assert data.val_images is None
    # PNG is lossless and 32x32 is not resampled: every image is the original, rightly labelled
    for path in (image_folder / "test" / "bicycle").glob("*.png"):
        i = int(path.stem)
        assert torch.equal(sample_data.test_images[i], _pixels(path))
        row = (data.test_images == sample_data.test_images[i]).flatten(1).all(1).nonzero()
        assert data.test_labels[row[0, 0]] == FOLDER_CLASSES.index("bicycle")
    # the training order is mixed (the validation split takes its tail)
    assert data.train_labels.tolist() != sorted(data.train_labels.tolist())


def test_flat_layout_gets_a_stable_stratified_split(image_folder, tmp_path):
    root = _flat(image_folder, tmp_path / "flat")
    data = load_folder(root, progress=False)
    per_class = {c: len(list((root / c).iterdir())) for c in FOLDER_CLASSES}
    assert len(data.train_labels) + len(data.test_labels) == sum(per_class.values())
    for i, c in enumerate(FOLDER_CLASSES):
        n_test = int((data.test_labels == i).sum())
        assert n_test == round(per_class[c] * 0.2) and n_test >= 1
    again = load_folder(root, progress=False, cache=False)
    assert torch.equal(again.test_images, data.test_images)
    assert torch.equal(again.train_images, data.train_images)


def test_val_folder_becomes_the_validation_split(image_folder, tmp_path):
    root = tmp_path / "withval"
    shutil.copytree(image_folder, root)
    for c in FOLDER_CLASSES:
        (root / "val" / c).mkdir(parents=True)
        for path in sorted((root / "train" / c).iterdir())[:2]:
            path.rename(root / "val" / c / path.name)
    data = load_folder(root, progress=False)
    assert data.val_images is not None and len(data.val_labels) == 6
    assert sorted(set(data.val_labels.tolist())) == [0, 1, 2]
    cfg = TrainConfig(
        model_args={"depth": 1, "dim": 32, "mlp_dim": 32}, epochs=1, device="cpu", dataset="folder"
    )
    fit(cfg, tmp_path / "run", data=data, progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["dataset"]["val_images"] == 6
    assert config["dataset"]["train_images"] == len(data.train_labels)  # nothing held out


def test_split_layout_without_test_splits_train(image_folder, tmp_path):
    root = tmp_path / "notest"
    shutil.copytree(image_folder / "train", root / "train")
    data = load_folder(root, progress=False)
    assert len(data.test_labels) >= 3 and sorted(set(data.test_labels.tolist())) == [0, 1, 2]


def test_cache_is_used_and_invalidated(image_folder, tmp_path, caplog):
    root = tmp_path / "imgs"
    shutil.copytree(image_folder, root)
    with caplog.at_level("INFO", logger="eanet.data.folders"):
        first = load_folder(root, progress=False)
        assert "decoding" in caplog.text and "using cached" not in caplog.text
        caplog.clear()
        second = load_folder(root, progress=False)
        assert "using cached" in caplog.text
        assert torch.equal(first.train_images, second.train_images)
        assert torch.equal(first.test_labels, second.test_labels)
        cached = list((tmp_path / "cache" / "folders").glob("*/images.safetensors"))
        assert len(cached) == 1
        assert json.loads((cached[0].parent / "classes.json").read_text())["class_names"] == (
            FOLDER_CLASSES
        )
        # another size, a changed file or a damaged cache: decode again
        caplog.clear()
        small = load_folder(root, image_size=16, progress=False)
        assert small.train_images.shape[-2:] == (16, 16) and "decoding" in caplog.text
        path = next((root / "train" / "apple").iterdir())
        os.utime(path, ns=(1, 1))
        caplog.clear()
        load_folder(root, progress=False)
        assert "decoding" in caplog.text
        caplog.clear()
        for f in (tmp_path / "cache" / "folders").glob("*/images.safetensors"):
            f.write_bytes(b"garbage")
        again = load_folder(root, progress=False)
        assert "unusable cache" in caplog.text
        assert torch.equal(again.test_images, first.test_images)


def test_unreadable_and_stray_files_are_reported_and_skipped(image_folder, tmp_path, caplog):
    root = tmp_path / "messy"
    shutil.copytree(image_folder, root)
    (root / "train" / "apple" / "corrupt.png").write_bytes(b"not a png")
    (root / "train" / "cloud" / "empty.jpg").write_bytes(b"")
    (root / "train" / "bicycle" / "notes.txt").write_text("hello")
    (root / "train" / "stray.png").write_bytes(b"x")
    (root / "train" / "cloud" / ".DS_Store").write_bytes(b"x")
    clean = load_folder(image_folder, progress=False)
    for attempt in range(2):  # reported again when the decoded images come from the cache
        caplog.clear()
        with caplog.at_level("INFO", logger="eanet.data.folders"):
            data = load_folder(root, progress=False)
        text = caplog.text
        assert "skipped 2 unreadable image(s)" in text, attempt
        assert "train/apple/corrupt.png (not an image Pillow can read)" in text
        assert "train/cloud/empty.jpg (empty file" in text
        assert "skipped 1 file(s) without an image extension: train/bicycle/notes.txt" in text
        assert "skipped 1 image(s) not inside train/CLASS/" in text
        assert ".DS_Store" not in text
        assert len(data.train_labels) == len(clean.train_labels)


def test_jpeg_and_large_images_are_resized(image_folder, tmp_path):
    root = tmp_path / "mixed"
    for c, colour in zip(FOLDER_CLASSES, [(255, 0, 0), (0, 255, 0), (0, 0, 255)], strict=True):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (200 + 10 * i, 120), colour).save(root / c / f"{i}.jpg", quality=95)
        Image.new("RGBA", (64, 64), (*colour, 255)).save(root / c / "alpha.png")
    data = load_folder(root, progress=False)
    assert data.train_images.shape[1:] == (3, 32, 32)
    for images, labels in (
        (data.train_images, data.train_labels),
        (data.test_images, data.test_labels),
    ):
        for img, label in zip(images, labels, strict=True):
            assert int(img.float().mean(dim=(1, 2)).argmax()) == int(label)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda r: None, "no image files in class folders"),
        (lambda r: _one_image(r / "only" / "a.png"), "1 class folder"),
        (lambda r: (_one_image(r / "a" / "x.png"), (r / "b").mkdir()), "hold no usable training"),
        (
            lambda r: (_one_image(r / "a" / "x.png"), _one_image(r / "b" / "x.png", b"x")),
            "hold no usable training",
        ),
        (
            lambda r: (
                _one_image(r / "train" / "a" / "x.png"),
                _one_image(r / "train" / "b" / "x.png"),
                _one_image(r / "test" / "zebra" / "x.png"),
            ),
            "class 'zebra' has no folder in train/",
        ),
    ],
)
def test_unusable_folders_are_clear_errors(tmp_path, setup, message):
    root = tmp_path / "data"
    root.mkdir()
    setup(root)
    with pytest.raises(DataError, match=message):
        load_folder(root, progress=False)


def _one_image(path, content: bytes | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    if content is None:
        Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    else:
        path.write_bytes(content)


def test_bad_paths_and_options(tmp_path):
    with pytest.raises(DataError, match="needs --data-path"):
        load_folder(None)
    with pytest.raises(DataError, match="no such directory"):
        load_folder(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="not a directory"):
        load_folder(tmp_path / "file")
    with pytest.raises(ConfigError, match="--image-size 0"):
        load_folder(tmp_path, image_size=0)
    with pytest.raises(ConfigError, match="--image-size 64 applies to --dataset folder"):
        load_dataset("cifar100", image_size=64)
    with pytest.raises(DataError, match="choose one of: .*cifar100.*folder"):
        load_dataset("imagenet")


def test_load_dataset_dispatches_folder(image_folder):
    data = load_dataset("folder", image_folder, image_size=16, progress=False)
    assert data.class_names == FOLDER_CLASSES and data.train_images.shape[-1] == 16


def test_write_image_folder_checks_its_options(sample_data, tmp_path):
    with pytest.raises(ConfigError, match="unknown class"):
        write_image_folder(sample_data, tmp_path, classes=["dragon"])
    with pytest.raises(ConfigError, match="format"):
        write_image_folder(sample_data, tmp_path, classes=["apple"], fmt="gif")
    counts = write_image_folder(sample_data, tmp_path / "j", classes=["apple"], fmt="jpg")
    assert counts["train"] + counts["test"] == len(list((tmp_path / "j").rglob("*.jpg")))


def test_cli_sample_images_writes_real_pngs_and_never_mixes(tmp_path, capsys):
    from eanet.cli.main import main

    out = tmp_path / "imgs"
    assert main(["sample-images", str(out), "--classes", "apple,cloud"]) == 0
    assert "of 2 classes" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "train").iterdir()) == ["apple", "cloud"]
    assert Image.open(next((out / "test" / "cloud").iterdir())).size == (32, 32)
    assert main(["sample-images", str(out)]) == 2  # not into a non-empty directory
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["sample-images", str(tmp_path / "x"), "--classes", "dragon"]) == 2
    assert "unknown class" in capsys.readouterr().err


# --------------------------------------------------------------------------- odd entries


def test_broken_and_self_links_are_skipped_and_reported(image_folder, tmp_path, caplog):
    root = tmp_path / "links"
    shutil.copytree(image_folder, root)
    (root / "train" / "apple" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "train" / "cloud" / "self.png").symlink_to(root / "train" / "cloud" / "self.png")
    clean = load_folder(image_folder, progress=False)
    with caplog.at_level("INFO", logger="eanet.data.folders"):
        data = load_folder(root, progress=False)
    assert "skipped 2 unreadable file(s)" in caplog.text
    assert "train/apple/gone.png (No such file or directory)" in caplog.text
    assert "train/cloud/self.png (Too many levels of symbolic links)" in caplog.text
    assert torch.equal(data.train_images, clean.train_images)


def _two_classes(root, names):
    for name in names:
        folder = os.path.join(os.fsencode(root), name if isinstance(name, bytes) else name.encode())
        os.makedirs(folder)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 90, 10, 10)).save(os.path.join(folder, b"%d.png" % i))


def test_a_class_folder_name_that_is_not_utf8_is_a_one_line_error(tmp_path):
    _two_classes(tmp_path / "d", [b"caf\xe9", b"tea"])  # Latin-1 bytes, not UTF-8
    with pytest.raises(DataError, match=r"class folder name 'caf\\\\xe9' is not valid UTF-8"):
        load_folder(tmp_path / "d", progress=False)


def test_a_file_name_that_is_not_utf8_is_skipped(image_folder, tmp_path, caplog):
    root = tmp_path / "names"
    shutil.copytree(image_folder, root)
    png = next((root / "train" / "apple").glob("*.png"))
    os.rename(png, os.path.join(os.fsencode(png.parent), b"\xff.png"))
    with caplog.at_level("INFO", logger="eanet.data.folders"):
        data = load_folder(root, progress=False)
    assert "skipped 1 unreadable file(s): train/apple/\\xff.png (not UTF-8)" in caplog.text
    assert len(data.train_labels) == len(load_folder(image_folder, progress=False).train_labels) - 1


def test_class_names_equal_under_unicode_normalisation_are_a_one_line_error(tmp_path):
    _two_classes(tmp_path / "d", ["caf\u00e9", "cafe\u0301"])  # NFC and NFD of "café"
    with pytest.raises(DataError, match="same name in different Unicode forms"):
        load_folder(tmp_path / "d", progress=False)


def test_training_on_a_folder_with_odd_entries_gives_no_traceback(tmp_path, capsys):
    from eanet.cli.main import main

    root = tmp_path / "d"
    _two_classes(root, ["a", "b"])
    (root / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (root / "b" / "loop.png").symlink_to(root / "b" / "loop.png")
    args = ["train", "--dataset", "folder", "--data-path", str(root), "--epochs", "1"]
    args += ["--model-arg", "depth=1", "--model-arg", "dim=32", "--model-arg", "mlp_dim=32"]
    args += ["--batch-size", "2", "--threads", "1", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    assert "Traceback" not in capsys.readouterr().err
