"""Write the trained Fashion-MNIST model and 1,000 test photos into the package's assets.

    python tools/ship_fashion_model.py runs/fashion-mnist/eanet-best

From the run (trained by `python benchmarks/fashion_mnist.py NAME`, NAME being the run
folder's name): its final weights,
without the optimizer's state, as src/eanet/assets/eanet-fashion-mnist.safetensors, whose
metadata keeps the run's config, history and test figures; and the first 1,000 photos of
the official test set (read and sha256-checked by eanet's Fashion-MNIST loader) as
src/eanet/assets/fashion-mnist-test-1000.npz. Prints the shipped model's top-1 on both.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np

from eanet import checkpoint
from eanet.data.fashion import SHIPPED_TEST, load_fashion_mnist, shipped_test_photos
from eanet.fileio import SHIPPED_MODELS, atomic_path
from eanet.inference import evaluate_tensors

NAME = "eanet-fashion-mnist"
PHOTOS = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="the trained run directory")
    args = parser.parse_args()
    model, ckpt = checkpoint.load_model(args.run, "cpu")
    metrics = json.loads((args.run / "metrics.json").read_text())
    meta = dataclasses.replace(
        ckpt.meta,
        optimizer=None,
        extra={
            **ckpt.meta.extra,
            "test": {k: metrics[k] for k in ("test_top1", "test_top5", "test_images")},
            "trained_by": f"python benchmarks/fashion_mnist.py {args.run.resolve().name}",
        },
    )
    checkpoint.save(SHIPPED_MODELS[NAME], model, meta)
    data = load_fashion_mnist(channels=1, progress=False)
    with atomic_path(SHIPPED_TEST) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(
            f,
            images=data.test_images[:PHOTOS, 0].numpy(),
            labels=data.test_labels[:PHOTOS].numpy().astype(np.uint8),
        )
    shipped, _ = checkpoint.load_model(NAME, "cpu")
    photos = evaluate_tensors(shipped, *shipped_test_photos())
    full = evaluate_tensors(shipped, data.test_images, data.test_labels)
    print(f"{NAME}: top-1 {photos.top1:.2%} on the {PHOTOS:,} shipped photos, ", end="")
    print(f"{full.top1:.2%} on all {full.count:,} test photos")


if __name__ == "__main__":
    main()
