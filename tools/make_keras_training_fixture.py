"""Record a training trajectory made by Keras itself: the reference EANet, its compile, 10 steps.

The fixture tests/fixtures/keras/training.npz proves that eanet's optimizer and training step
are the reference's: `tests/test_keras_training.py` starts eanet from the same weights (the
import-keras fixture, eanet.weights.h5), trains on the same batches and must end where Keras
ended. Run it in a Keras 3 environment (not eanet's):

    KERAS_VENV/bin/python tools/make_keras_training_fixture.py   # Keras 3.15.1, TF 2.21

What runs is the example's model (tools/keras_reference.py, verbatim) and its `compile`
(AdamW(learning_rate=1e-3, weight_decay=1e-4), CategoricalCrossentropy(label_smoothing=0.1)),
one `train_on_batch` per step, on the first STEPS x BATCH training images of the CIFAR-100
slice shipped with eanet, in order. Two things are switched off so that the trajectory is
deterministic: every Dropout's rate is 0, and the four random augmentation layers pass their
input through (the Normalization layer stays). Recorded, keyed by the dataset paths of a Keras
weights file (so eanet's importer maps them): the weights after steps 1, 5 and 10 and the
Adam moments m and v after step 10 (written into the model's variables, saved, restored), and
the loss of every step.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from keras_reference import build  # noqa: E402  (the example's code, verbatim)
from make_keras_fixture import h5_tensors, read_slice  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "keras"
STEPS = 10
BATCH = 48  # 10 x 48 = 480 of the slice's 486 training images
SNAPSHOTS = (1, 5, 10)
RANDOM_LAYERS = (layers.RandomFlip, layers.RandomRotation, layers.RandomContrast, layers.RandomZoom)


def deterministic(model: keras.Model) -> None:
    """Dropout rate 0 everywhere; the random augmentation layers pass their input through."""
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, layers.Dropout):
            layer.rate = 0.0
        elif isinstance(layer, RANDOM_LAYERS):
            layer.call = lambda inputs, training=None: inputs


def weights_by_path(model: keras.Model) -> dict[str, np.ndarray]:
    """The model's variables as a Keras weights file holds them: dataset path -> array."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.weights.h5"
        model.save_weights(path)
        return {k: v for k, v in h5_tensors(path).items() if k.startswith("layers/")}


def slots_by_path(model: keras.Model, optimizer, which: str) -> dict[str, np.ndarray]:
    """Adam's `which` slot ("m" or "v") of every trainable variable, in the weights layout."""
    slots = optimizer._momentums if which == "m" else optimizer._velocities
    saved = [np.array(v) for v in model.trainable_variables]
    for var in model.trainable_variables:
        var.assign(slots[optimizer._get_variable_index(var)])
    try:
        return weights_by_path(model)
    finally:
        for var, value in zip(model.trainable_variables, saved, strict=True):
            var.assign(value)


def main() -> None:
    """Write training.npz and training.json beside the import-keras fixture."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()
    keras.utils.set_random_seed(1234)
    train, _, _ = read_slice()
    labels = read_train_labels()
    model = build("external_attention", None)
    model.load_weights(FIXTURE / "eanet.weights.h5")
    deterministic(model)
    optimizer = keras.optimizers.AdamW(learning_rate=1e-3, weight_decay=1e-4)
    model.compile(
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1), optimizer=optimizer
    )
    record: dict[str, np.ndarray] = {}
    losses = []
    for step in range(1, STEPS + 1):
        rows = slice((step - 1) * BATCH, step * BATCH)
        x = train[rows].astype(np.float32)
        y = keras.utils.to_categorical(labels[rows], 100)
        losses.append(float(model.train_on_batch(x, y)))
        if step in SNAPSHOTS:
            record.update({f"w{step}/{k}": v for k, v in weights_by_path(model).items()})
    for which in ("m", "v"):
        record.update(
            {f"{which}{STEPS}/{k}": v for k, v in slots_by_path(model, optimizer, which).items()}
        )
    record["losses"] = np.asarray(losses, dtype=np.float64)
    record["labels"] = labels[: STEPS * BATCH]
    buf = io.BytesIO()
    np.savez_compressed(buf, **record)
    (args.out / "training.npz").write_bytes(buf.getvalue())
    import tensorflow as tf

    provenance = {
        "made_by": "tools/make_keras_training_fixture.py",
        "keras": keras.__version__,
        "tensorflow": tf.__version__,
        "start": "eanet.weights.h5 (the import-keras fixture)",
        "batches": f"{STEPS} batches of {BATCH}: the first {STEPS * BATCH} training images of "
        "src/eanet/assets/cifar-100-sample.tar.gz, in order, fine labels one-hot",
        "compile": "AdamW(learning_rate=1e-3, weight_decay=1e-4), "
        "CategoricalCrossentropy(label_smoothing=0.1)",
        "switched_off": "Dropout rate 0; RandomFlip/Rotation/Contrast/Zoom pass through",
        "snapshots": {"weights": list(SNAPSHOTS), "adam_m_v": [STEPS]},
        "losses": losses,
    }
    (args.out / "training.json").write_text(json.dumps(provenance, indent=2) + "\n")
    print(json.dumps(provenance, indent=2))


def read_train_labels() -> np.ndarray:
    """Fine labels of the shipped slice's training images."""
    import pickle
    import tarfile

    from make_keras_fixture import SAMPLE

    with tarfile.open(SAMPLE) as tar:
        member = tar.extractfile("cifar-100-python/train")
        return np.asarray(pickle.load(member, encoding="latin1")["fine_labels"])


if __name__ == "__main__":
    main()
