"""Shared fixtures: the shipped CIFAR-100 slice and scikit-learn's real digits."""

import pytest
import torch
import torch.nn.functional as F

from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.data.dataset import ImageData
from eanet.data.load import load_dataset


@pytest.fixture(scope="session")
def sample_data() -> ImageData:
    """The real CIFAR-100 slice in the package (486 train, 916 test images)."""
    return load_dataset("cifar100", SAMPLE_ARCHIVE, md5=SAMPLE_MD5, progress=False)


@pytest.fixture(scope="session")
def small_sample(sample_data) -> ImageData:
    """A quick subset of the slice: 96 train and 64 test images, all 100 class names."""
    d = sample_data
    return ImageData(
        d.name,
        d.class_names,
        d.train_images[:96],
        d.train_labels[:96],
        d.test_images[:64],
        d.test_labels[:64],
    )


@pytest.fixture(scope="session")
def digits_data() -> ImageData:
    """scikit-learn's 1,797 real 8x8 digits as 32x32 RGB uint8; a fixed held-out quarter."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] * (255 / 16)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False)
    x = x.round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    test, train = perm[: len(y) // 4], perm[len(y) // 4 :]
    names = [str(i) for i in range(10)]
    return ImageData("digits", names, x[train], y[train], x[test], y[test])


FOLDER_CLASSES = ["apple", "bicycle", "cloud"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_sample):
    """A run directory: a tiny EANet (1 block, width 32) trained 1 epoch on the real slice."""
    from eanet.train.config import TrainConfig
    from eanet.train.loop import fit

    run = tmp_path_factory.mktemp("tiny_run")
    cfg = TrainConfig(
        model_args={"depth": 1, "dim": 32, "mlp_dim": 32}, epochs=1, batch_size=32, device="cpu"
    )
    fit(cfg, run, data=small_sample, progress=False)
    return run


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory, sample_data):
    """Real CIFAR-100 images of 3 classes as PNG files: DIR/{train,test}/CLASS/NNNN.png."""
    from eanet.data.folders import write_image_folder

    root = tmp_path_factory.mktemp("images")
    write_image_folder(sample_data, root, classes=FOLDER_CLASSES)
    return root
