"""Speed of the Keras example itself, measured the way `eanet bench` measures eanet.

The model, loss, optimizer and metrics are the example's (tools/keras_reference.py, its
code verbatim); the data are random CIFAR-shaped images, since only speed is measured.
Training: `train_on_batch` on one fixed batch (augmentation included, as the example puts
it inside the model); inference: `predict_on_batch`. Warm-up steps are excluded and the
median of the timed steps is reported, as in eanet.bench. Needs Keras 3 + TensorFlow:

    pip install 'eanet[reference]'
    python benchmarks/reference_keras.py --model eanet --batch-size 128 --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # the reference's fastest backend here
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import keras  # noqa: E402
import keras_reference as ref  # noqa: E402
import numpy as np  # noqa: E402

ATTENTION = {"eanet": "external_attention", "vit": "self_attention"}


def timed(fn, warmup: int, steps: int) -> list[float]:
    """Seconds per call after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def measure(model_name: str, batch_size: int, warmup: int, steps: int) -> dict:
    """Train-step and inference images/s of the reference model (median of `steps`)."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (batch_size, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 100, batch_size), 100)
    model = ref.build(ATTENTION[model_name], adapt_images=x)
    model.compile(
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=ref.label_smoothing),
        optimizer=keras.optimizers.AdamW(
            learning_rate=ref.learning_rate, weight_decay=ref.weight_decay
        ),
        metrics=[
            keras.metrics.CategoricalAccuracy(name="accuracy"),
            keras.metrics.TopKCategoricalAccuracy(5, name="top-5-accuracy"),
        ],
    )
    train = timed(lambda: model.train_on_batch(x, y), warmup, steps)
    infer = timed(lambda: model.predict_on_batch(x), warmup, steps)
    return {
        "framework": f"keras {keras.__version__} ({keras.backend.backend()} backend)",
        "model": model_name,
        "batch_size": batch_size,
        "warmup": warmup,
        "steps": steps,
        "params": model.count_params(),
        "train_img_s": batch_size / statistics.median(train),
        "infer_img_s": batch_size / statistics.median(infer),
        "train_step_s": train,
        "infer_step_s": infer,
        "machine": platform.platform(),
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=sorted(ATTENTION), default="eanet")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = measure(args.model, args.batch_size, args.warmup, args.steps)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(
            f"{r['framework']} {r['model']} batch {r['batch_size']}: train "
            f"{r['train_img_s']:.1f} img/s, inference {r['infer_img_s']:.1f} img/s"
        )


if __name__ == "__main__":
    main()
