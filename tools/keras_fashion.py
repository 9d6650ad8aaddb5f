"""The Keras example's own code trained on Fashion-MNIST: the side-by-side for eanet's curves.

Runs in a Keras 3 environment (not eanet's; `pip install 'eanet[reference]'`):

    KERAS_VENV/bin/python tools/keras_fashion.py --order reference --epochs 10
    KERAS_VENV/bin/python tools/keras_fashion.py --order fixed --epochs 10

The model is the example's (tools/keras_reference.py, verbatim) at Fashion-MNIST's own input,
as `eanet-fashion` is: 28x28x1, 4x4 patches (49 tokens), 10 classes, the example's depth,
widths and dropouts; compiled as the example compiles it (AdamW lr 1e-3, weight decay 1e-4,
label smoothing 0.1, batch 128) and trained on the first 80% of the 60,000 training photos
(the example's `validation_split=0.2`: the last 20% validate). `--order reference` is the
example's augmentation block (Normalization first: the bug); `--order fixed` moves the
Normalization after the four random layers, as eanet does. After every epoch the weights,
the optimizer's variables and the record (validation and test top-1/top-5, seconds) are
saved to benchmarks/results/fashion-mnist/keras-<order>-s<seed>.json and OUT; the same
command goes on from the last complete epoch (the augmentation's random stream restarts).
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import keras_reference as ref  # noqa: E402  (the example's code, verbatim)
from compare_reference import machine_class  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "fashion-mnist"
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
PLANNED = 10  # epochs of a run, as benchmarks/fashion_mnist.py's curves


def read_idx(path: Path) -> np.ndarray:
    """An idx file (gzipped or plain) as a uint8 array of the shape its header gives."""
    raw = path.read_bytes()
    raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(folder: Path) -> tuple[np.ndarray, ...]:
    def part(name: str) -> np.ndarray:
        found = [p for p in (folder / name, folder / f"{name}.gz") if p.exists()]
        if not found:
            sys.exit(f"{folder}: no {name}(.gz); apt-get install dataset-fashion-mnist")
        return read_idx(found[0])

    x = part("train-images-idx3-ubyte")[..., None].astype("float32")
    xt = part("t10k-images-idx3-ubyte")[..., None].astype("float32")
    return x, part("train-labels-idx1-ubyte"), xt, part("t10k-labels-idx1-ubyte")


def augmentation(order: str) -> keras.Sequential:
    """The example's block ('reference': Normalization first) or with it moved last."""
    random_layers = [
        layers.RandomFlip("horizontal"),
        layers.RandomRotation(factor=0.1),
        layers.RandomContrast(factor=0.1),
        layers.RandomZoom(height_factor=0.2, width_factor=0.2),
    ]
    norm = [layers.Normalization()]
    stack = norm + random_layers if order == "reference" else random_layers + norm
    return keras.Sequential(stack, name="data_augmentation")


def build_model(order: str, x_train: np.ndarray) -> keras.Model:
    ref.num_classes, ref.input_shape, ref.patch_size = 10, (28, 28, 1), 4
    ref.num_patches = (28 // 4) ** 2
    ref.data_augmentation = augmentation(order)
    norm = next(la for la in ref.data_augmentation.layers if isinstance(la, layers.Normalization))
    norm.adapt(x_train)  # the example adapts on its training images
    model = ref.get_model("external_attention")
    model.compile(
        optimizer=keras.optimizers.AdamW(
            learning_rate=ref.learning_rate, weight_decay=ref.weight_decay
        ),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=ref.label_smoothing),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(5, name="top-5-accuracy"),
        ],
    )
    return model


def save_state(model: keras.Model, out: Path) -> None:
    model.save_weights(out / "model.weights.h5")
    opt = {f"v{i}": v.numpy() for i, v in enumerate(model.optimizer.variables)}
    np.savez(out / "optimizer.npz", **opt)


def restore_state(model: keras.Model, out: Path) -> None:
    model.load_weights(out / "model.weights.h5")
    model.optimizer.build(model.trainable_variables)
    saved = np.load(out / "optimizer.npz")
    for i, v in enumerate(model.optimizer.variables):
        v.assign(saved[f"v{i}"])


def cpu_flags() -> list[str]:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        line = next((la for la in f if la.startswith("flags")), "")
    return line.partition(":")[2].split()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--order", choices=("reference", "fixed"), required=True)
    parser.add_argument(
        "--epochs", type=int, default=PLANNED, help=f"train up to this epoch (the run is {PLANNED})"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-path", type=Path, default=DEBIAN)
    parser.add_argument("--out", type=Path, help="state folder (default: runs/fashion-mnist/NAME)")
    parser.add_argument("--threads", type=int, help="TensorFlow's intra-op threads (default: all)")
    parser.add_argument(
        "--idle", action="store_true", help="nothing else runs: the seconds are timings"
    )
    return parser.parse_args()


def set_threads(threads: int | None) -> None:
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)


def one_epoch(model: keras.Model, data: dict, epoch: int, args: argparse.Namespace) -> dict:
    """Train one epoch, then validate (timed with it, as eanet's epoch_seconds) and test."""
    t0 = time.perf_counter()
    fit = model.fit(*data["train"], batch_size=ref.batch_size, epochs=1, verbose=0)
    train_s = time.perf_counter() - t0
    val = model.evaluate(*data["val"], batch_size=500, verbose=0, return_dict=True)
    epoch_s = time.perf_counter() - t0
    test = model.evaluate(*data["test"], batch_size=500, verbose=0, return_dict=True)
    return {
        "epoch": epoch,
        "train_loss": fit.history["loss"][0],
        "train_top1": fit.history["accuracy"][0],
        "val_top1": val["accuracy"],
        "val_top5": val["top-5-accuracy"],
        "test_top1": test["accuracy"],
        "test_top5": test["top-5-accuracy"],
        "train_seconds": round(train_s, 1),
        "epoch_seconds": round(epoch_s, 1),
        "test_seconds": round(time.perf_counter() - t0 - epoch_s, 1),
        "threads": args.threads,
        "idle": args.idle,
    }


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    name = f"keras-{args.order}-s{args.seed}"
    out = args.out or ROOT / "runs" / "fashion-mnist" / name
    out.mkdir(parents=True, exist_ok=True)
    record_path = RESULTS / f"{name}.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else None
    keras.utils.set_random_seed(args.seed)
    x, y, xt, yt = load(args.data_path)
    split = int(len(x) * (1 - ref.validation_split))  # Keras's validation_split rule
    onehot = keras.utils.to_categorical
    data = {
        "train": (x[:split], onehot(y[:split], 10)),
        "val": (x[split:], onehot(y[split:], 10)),
        "test": (xt, onehot(yt, 10)),
    }
    model = build_model(args.order, x)
    rows = record["history"] if record else []
    if rows:
        restore_state(model, out)
    for epoch in range(len(rows) + 1, args.epochs + 1):
        rows.append(one_epoch(model, data, epoch, args))
        save_state(model, out)
        record = {
            "experiment": name,
            "what": f"the Keras example's code, augmentation order {args.order!r}, 28x28x1",
            "command": f"KERAS_VENV/bin/python tools/keras_fashion.py --order {args.order}",
            "epochs_planned": PLANNED,
            "keras": keras.__version__,
            "backend": keras.backend.backend(),
            "machine_class": machine_class({"cpu_flags": cpu_flags()}),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "history": rows,
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        record_path.write_text(json.dumps(record, indent=1) + "\n")
        print(f"{name} epoch {epoch}: {rows[-1]}", flush=True)


if __name__ == "__main__":
    main()
