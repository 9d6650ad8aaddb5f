"""The offline demo: EANet learns real digits, the CIFAR-100 pipeline runs, a trained
EANet classifies real Fashion-MNIST photos.

Everything ships in the package (assets/README.md), so nothing is downloaded. Part 1
shows learning: a reduced EANet (2 blocks, 4x4 patches; the settings of the learning check
in tests/test_train.py) trained on 1,348 real digits and scored on the 449 held out. Part 2
shows the pipeline: the reference EANet and recipe on the shipped CIFAR-100 slice (486
training images), evaluated with its reports; far too few images to learn 100 classes.
Part 3 shows a trained model: the EANet shipped as `eanet-fashion-mnist` (trained on the
full Fashion-MNIST) on the 1,000 test photos shipped beside it, a few of them written out
as PNG files for `eanet predict`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from eanet import checkpoint
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.data.dataset import ImageData
from eanet.data.fashion import shipped_test_photos
from eanet.data.load import load_dataset
from eanet.errors import EANetError
from eanet.evaluate import evaluate_checkpoint
from eanet.fileio import SHIPPED_MODELS
from eanet.inference import predict_logits
from eanet.runtime import resolve_device
from eanet.train.config import TrainConfig
from eanet.train.loop import fit
from eanet.train.rundir import check_new_run, is_run

DEMO_EPOCHS = 4  # CIFAR part
SHIPPED_NAME = next(iter(SHIPPED_MODELS))  # part 3: the trained Fashion-MNIST EANet
# The digits part: the configuration of the learning check in tests/test_train.py.
DIGITS_RECIPE = dict(
    model_args={"depth": 2, "patch_size": 4},
    epochs=8,
    batch_size=32,
    lr=2e-3,
    val_fraction=0.0,
    augment="none",  # flips and 36-degree turns change what a digit means
)


@dataclass
class Prediction:
    """One test image: its true class and the model's top classes with probabilities."""

    test_index: int
    true: str
    top: list[tuple[str, float]]

    @property
    def correct(self) -> bool:
        """Whether the most probable class is the true one."""
        return self.top[0][0] == self.true


@dataclass
class DemoPart:
    """One trained and tested run of the demo."""

    run_dir: Path
    metrics: dict
    train_images: int
    chance_top1: float
    seconds: float
    predictions: list[Prediction] = field(default_factory=list)
    evaluation: dict | None = None


@dataclass
class DemoResult:
    """The three parts of the demo and the thread count they ran with."""

    digits: DemoPart
    cifar: DemoPart
    shipped: ShippedPart
    torch_threads: int


def _predict(
    run_dir: Path, data: ImageData, indices: list[int], device: str, k: int
) -> list[Prediction]:
    """The top-`k` classes (names, probabilities) of the checkpoint for some test images."""
    model, ckpt = checkpoint.load_model(run_dir, resolve_device(device))
    probs = predict_logits(model, data.test_images[indices]).softmax(dim=1)
    return _top(probs, data.test_labels[indices], indices, ckpt.class_names, k)


def _top(
    probs: torch.Tensor, labels: torch.Tensor, indices: list[int], names: list[str], k: int
) -> list[Prediction]:
    top = probs.topk(k, dim=1)
    return [
        Prediction(
            test_index=i,
            true=names[int(label)],
            top=[(names[int(c)], float(p)) for p, c in zip(vals, idx, strict=True)],
        )
        for i, label, vals, idx in zip(indices, labels, top.values, top.indices, strict=True)
    ]


@dataclass
class ShippedPart:
    """The trained model shipped in the package, scored on the shipped test photos."""

    name: str
    photos: int
    top1: float
    seconds: float
    predictions: list[Prediction]
    folder: Path  # the shown photos as PNG files, for `eanet predict NAME FOLDER`


def run_shipped(out: Path, show: int, device: str) -> ShippedPart:
    """Part 3: the trained EANet shipped in the package classifies the 1,000 real
    Fashion-MNIST test photos shipped beside it (nothing is trained); the first `show`
    are written to OUT as PNG files."""
    t0 = time.perf_counter()
    model, ckpt = checkpoint.load_model(SHIPPED_NAME, resolve_device(device))
    images, labels = shipped_test_photos()
    probs = predict_logits(model, images).softmax(dim=1)
    top1 = float((probs.argmax(dim=1) == labels.to(probs.device)).float().mean())
    shown = list(range(min(show, len(images))))
    predictions = _top(probs[shown], labels[shown], shown, ckpt.class_names, k=1)
    out.mkdir(parents=True, exist_ok=True)
    for i, p in zip(shown, predictions, strict=True):
        name = p.true.lower().replace("/", "-").replace(" ", "-")
        Image.fromarray(images[i, 0].numpy()).save(out / f"{i:04d}-{name}.png")
    seconds = time.perf_counter() - t0
    return ShippedPart(SHIPPED_NAME, len(images), top1, seconds, predictions, out)


def _part(
    cfg: TrainConfig, out: Path, data: ImageData, overwrite: bool, progress: bool
) -> DemoPart:
    """Train one part's run (replacing an earlier run in `out` only with `overwrite`), timed."""
    t0 = time.perf_counter()
    metrics = fit(cfg, out, data=data, overwrite=overwrite, progress=progress)
    seconds = time.perf_counter() - t0
    return DemoPart(out, metrics, len(data.train_images), 1 / data.num_classes, seconds)


def run_digits(
    out: Path,
    show: int,
    seed: int,
    device: str,
    threads: int | None,
    progress: bool,
    overwrite: bool = False,
) -> DemoPart:
    """Part 1: train the reduced EANet on the real digits; predict `show` held-out ones."""
    cfg = TrainConfig(dataset="digits", seed=seed, device=device, threads=threads, **DIGITS_RECIPE)
    data = load_dataset("digits")
    part = _part(cfg, out, data, overwrite, progress)
    part.predictions = _predict(out, data, list(range(show)), device, k=1)
    return part


def run_cifar(
    out: Path,
    epochs: int,
    show: int,
    seed: int,
    device: str,
    threads: int | None,
    progress: bool,
    overwrite: bool = False,
) -> DemoPart:
    """Part 2: the reference EANet and recipe on the CIFAR-100 slice, with evaluation reports."""
    cfg = TrainConfig(
        dataset="cifar100",
        data_path=str(SAMPLE_ARCHIVE),
        md5=SAMPLE_MD5,
        epochs=epochs,
        seed=seed,
        device=device,
        threads=threads,
    )
    data = load_dataset("cifar100", SAMPLE_ARCHIVE, md5=SAMPLE_MD5, progress=progress)
    part = _part(cfg, out, data, overwrite, progress)
    part.evaluation = evaluate_checkpoint(out, device=device, progress=progress, data=data)
    part.predictions = _predict(out, data, list(range(show)), device, k=3)
    return part


def run_demo(
    out: str | Path,
    epochs: int = DEMO_EPOCHS,
    show: int = 8,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> DemoResult:
    """Part 1 in OUT/digits, part 2 in OUT itself; `epochs` is the CIFAR part's.

    OUT is the CIFAR-100 run, so `eanet predict/serve/export OUT` and `--init-from OUT`
    get a 100-class checkpoint, as the docs use it. OUT and OUT/digits must be new or
    empty, or (with `overwrite`) an earlier demo's runs, whose run files alone are
    replaced; both are checked before anything is trained. Part 2 trains first, so that
    OUT is a run (or nothing) when OUT/digits is made inside it.
    """
    out = Path(out)
    for run_dir in (out, out / "digits"):
        if is_run(run_dir) and not overwrite:
            raise EANetError(
                f"{run_dir} holds a run (an earlier demo's?); pass --overwrite to replace "
                "it, or choose another --out"
            )
        check_new_run(run_dir, overwrite)  # a folder that is not a run: refused
    cifar = run_cifar(out, epochs, show, seed, device, threads, progress, overwrite)
    digits = run_digits(out / "digits", show, seed, device, threads, progress, overwrite)
    shipped = run_shipped(out / "fashion-photos", show, device)
    return DemoResult(digits, cifar, shipped, torch.get_num_threads())
