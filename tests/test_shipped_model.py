"""The trained model shipped in the package (`eanet-fashion-mnist`) and the 1,000 test photos
beside it: the name resolves wherever a run is asked for, the model really classifies real
photos, and the photos are the official test set's."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import eanet
from eanet import checkpoint, fileio
from eanet.cli import main
from eanet.data.fashion import CLASS_NAMES, PACKAGE_DIR, load_fashion_mnist, shipped_test_photos
from eanet.errors import ConfigError
from eanet.inference import evaluate_tensors

NAME = "eanet-fashion-mnist"
# The shipped model's top-1 on the shipped photos must stay near what it measured when it
# was written (tools/ship_fashion_model.py prints it); a broken load or preprocessing falls
# far below.
MIN_TOP1 = 0.85


def test_the_name_stands_for_the_packaged_checkpoint():
    assert fileio.resolve(NAME) == fileio.SHIPPED_MODELS[NAME]
    assert fileio.SHIPPED_MODELS[NAME].is_file()
    with pytest.raises(ConfigError, match="one set of weights; use --weights last"):
        fileio.resolve(NAME, "best")


def test_a_folder_of_that_name_here_is_the_users_own(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / NAME).mkdir()
    shutil.copyfile(fileio.SHIPPED_MODELS[NAME], tmp_path / NAME / fileio.CHECKPOINT_NAME)
    assert fileio.resolve(NAME).resolve() == (tmp_path / NAME / fileio.CHECKPOINT_NAME)


def test_the_shipped_model_is_a_fashion_model_without_training_state():
    ckpt = checkpoint.load(fileio.SHIPPED_MODELS[NAME])
    meta = ckpt.meta
    assert meta.model_name == "eanet-fashion" and meta.class_names == list(CLASS_NAMES)
    assert meta.train_config["dataset"] == "fashion-mnist" and meta.history
    assert (
        0.85 < meta.extra["test"]["test_top1"] <= 1 and meta.extra["test"]["test_images"] == 10000
    )
    assert ckpt.optimizer_state is None and meta.optimizer is None and not ckpt.rng_state


def test_it_classifies_the_shipped_real_photos():
    images, labels = shipped_test_photos()
    assert images.shape == (1000, 1, 28, 28) and images.dtype == torch.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    model, _ = checkpoint.load_model(NAME, "cpu")
    m = evaluate_tensors(model, images, labels)
    assert m.top1 >= MIN_TOP1, m


def test_the_api_and_predict_take_the_name(tmp_path, capsys):
    images, labels = shipped_test_photos()
    clf = eanet.load(NAME, device="cpu")
    right = [clf.predict(images[i]).label == CLASS_NAMES[int(labels[i])] for i in range(20)]
    assert sum(right) >= 15, right
    photo = tmp_path / "boot.png"
    first_boot = int((labels == 9).nonzero()[0])
    Image.fromarray(images[first_boot, 0].numpy()).save(photo)
    assert main(["predict", NAME, str(photo)]) == 0
    assert "Ankle boot" in capsys.readouterr().out


def test_info_describes_it(capsys):
    assert main(["info", NAME]) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[0]
    assert first.startswith("eanet-fashion") and "(EANet), input 1x28x28, 10 classes" in first
    assert str(fileio.SHIPPED_MODELS[NAME]) in out
    assert "trained by python benchmarks/fashion_mnist.py eanet-" in out and "test top-1" in out


def test_evaluate_of_the_shipped_model_needs_an_out_folder(capsys):
    assert main(["evaluate", NAME]) == 2
    assert "shipped in the package: give --out DIR" in capsys.readouterr().err


@pytest.mark.skipif(not PACKAGE_DIR.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_the_shipped_photos_are_the_official_first_thousand():
    data = load_fashion_mnist(channels=1, progress=False)  # sha256-checked
    images, labels = shipped_test_photos()
    assert torch.equal(images, data.test_images[:1000])
    assert torch.equal(labels, data.test_labels[:1000])
    assert np.load(fileio.ASSETS / "fashion-mnist-test-1000.npz")["images"].dtype == np.uint8
