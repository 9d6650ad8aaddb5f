"""Build the Keras example's EANet and ViT in Keras, save their weights and Keras's outputs.

The fixture under tests/fixtures/keras/ proves that `eanet import-keras` maps every weight:
`tests/test_interop_keras.py` imports these files without Keras and must reproduce the
probabilities Keras computed here. Run it in a Keras 3 environment (not eanet's):

    KERAS_VENV/bin/python tools/make_keras_fixture.py   # Keras 3.15.1, TF-CPU 2.21.0

The model code (tools/keras_reference.py) is the example's, verbatim (its augmentation
layers included: they are identity at inference, and they make the weight file's layout
the reference's). Weights are Keras's own initialisation; then every bias, LayerNorm
gamma/beta and the normalization statistics are perturbed with random values, and the head
is scaled so the outputs are far from uniform, so that any wrong mapping shows in the
probabilities. The input images are real: the first test images of the CIFAR-100 slice
shipped with eanet (read with tarfile + pickle; eanet itself is not imported here).
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import tarfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import sys  # noqa: E402

import h5py  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from keras_reference import build  # noqa: E402  (the example's code, verbatim)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "eanet" / "assets" / "cifar-100-sample.tar.gz"
OUT = ROOT / "tests" / "fixtures" / "keras"
NUM_IMAGES = 8
SEED = 1234
HEAD_SCALE = 4.0  # spreads the logits: near-uniform outputs would hide mapping mistakes


def read_slice() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train images, test images (NHWC uint8) and test fine labels of the shipped slice."""
    with tarfile.open(SAMPLE) as tar:

        def member(name: str) -> dict:
            f = tar.extractfile(f"cifar-100-python/{name}")
            return pickle.load(f, encoding="latin1")

        train, test = member("train"), member("test")

    def nhwc(data: np.ndarray) -> np.ndarray:
        return np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)

    return nhwc(train["data"]), nhwc(test["data"]), np.asarray(test["fine_labels"])


def perturb(model: keras.Model, rng: np.random.Generator, count_pixels: int) -> None:
    """Random biases, LayerNorm gamma/beta and normalization stats; a scaled head."""
    norm = model.get_layer(index=1).layers[0]
    mean, var, count = (np.asarray(w) for w in norm.get_weights())
    mean = mean + rng.normal(0.0, 8.0, mean.shape)
    var = var * rng.uniform(0.7, 1.4, var.shape)
    # Keras 3's adapt leaves count at 0; a non-zero count shows that it is mapped too.
    count = np.asarray(count_pixels, dtype=count.dtype)
    norm.set_weights([mean.astype(np.float32), var.astype(np.float32), count])
    norm.finalize_state()  # the layer uses mean/variance copies made from the variables
    head = model.layers[-1]
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, layers.LayerNormalization):
            gamma, beta = layer.get_weights()
            gamma = 1.0 + rng.normal(0.0, 0.2, gamma.shape)
            beta = rng.normal(0.0, 0.1, beta.shape)
            layer.set_weights([gamma.astype(np.float32), beta.astype(np.float32)])
        elif isinstance(layer, (layers.Dense, layers.EinsumDense)):
            kernel, bias = layer.get_weights()
            bias = rng.normal(0.0, 0.1, bias.shape)
            if layer is head:
                kernel = kernel * HEAD_SCALE
            layer.set_weights([kernel.astype(np.float32), bias.astype(np.float32)])
        elif isinstance(layer, layers.Embedding):
            (table,) = layer.get_weights()
            layer.set_weights([(table + rng.normal(0.0, 0.02, table.shape)).astype(np.float32)])


def h5_tensors(path_or_file) -> dict[str, np.ndarray]:
    """Every dataset of an h5 file, by path."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path_or_file, "r") as f:
        f.visititems(
            lambda name, obj: out.__setitem__(name, obj[()]) if hasattr(obj, "dtype") else None
        )
    return out


def make(name: str, attention_type: str, images: dict, rng: np.random.Generator, out: Path) -> dict:
    """Build, perturb and save one model; return its reloaded model's probabilities."""
    model = build(attention_type, images["train"].astype(np.float32))
    perturb(model, rng, images["train"].shape[0] * 32 * 32)
    x = images["inputs"].astype(np.float32)
    probs = np.asarray(model(x, training=False))
    weights_file = out / f"{name}.weights.h5"
    model.save_weights(weights_file)
    # The probabilities recorded are those of a fresh reference model loading the file, so
    # they are exactly what the file holds.
    fresh = build(attention_type, None)
    fresh.load_weights(weights_file)
    reloaded = np.asarray(fresh(x, training=False))
    assert np.abs(reloaded - probs).max() < 1e-6, np.abs(reloaded - probs).max()
    info = {
        "weights_file": weights_file.name,
        "parameters": int(model.count_params()),
        "max_prob_per_image": [round(float(p), 4) for p in reloaded.max(axis=1)],
    }
    if name == "eanet":
        keras_file = out / f"{name}.keras"
        model.save(keras_file)
        import zipfile

        with zipfile.ZipFile(keras_file) as z, z.open("model.weights.h5") as f:
            import io

            inner = h5_tensors(io.BytesIO(f.read()))
        outer = h5_tensors(weights_file)
        layer_keys = [k for k in outer if k.startswith("layers/")]
        assert all(np.array_equal(inner[k], outer[k]) for k in layer_keys)
        info["keras_file"] = keras_file.name
    print(f"{name}: {info}")
    return {"probs": reloaded, "info": info}


def main() -> None:
    """Write the fixture: weights files, one .keras, inputs and Keras's probabilities."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    train, test, labels = read_slice()
    images = {"train": train, "inputs": test[:NUM_IMAGES]}
    results = {
        "eanet": make("eanet", "external_attention", images, rng, out),
        "vit": make("vit", "self_attention", images, rng, out),
    }
    np.savez_compressed(
        out / "expected.npz",
        images_nhwc=images["inputs"],
        labels=labels[:NUM_IMAGES],
        eanet_probs=results["eanet"]["probs"],
        vit_probs=results["vit"]["probs"],
    )
    provenance = {
        "made_by": "tools/make_keras_fixture.py",
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "seed": SEED,
        "inputs": f"first {NUM_IMAGES} test images of src/eanet/assets/cifar-100-sample.tar.gz",
        "normalization_adapted_on": f"the slice's {len(train)} training images, then perturbed; "
        "count set to their pixel count (Keras 3 adapt leaves it 0)",
        "models": {k: v["info"] for k, v in results.items()},
    }
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        provenance["tensorflow"] = tf.__version__
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")


if __name__ == "__main__":
    main()
