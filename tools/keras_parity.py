"""Print how far the imported Keras fixtures are from Keras's own probabilities.

    PYTHONPATH=src python tools/keras_parity.py [--threads 1]

Reads tests/fixtures/keras/ (made by tools/make_keras_fixture.py with Keras 3.15.1): each
Keras file imported by `eanet import-keras`'s reader, run on the fixture's 8 real CIFAR-100
test images, against the probabilities Keras computed. tests/test_interop_keras.py asserts
the same difference is below 1e-4; this prints the figure the docs quote, with the CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from eanet.interop import keras as K
from eanet.runtime import cpu_info

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "keras"
FILES = {
    "eanet.weights.h5": "eanet_probs",
    "eanet.keras": "eanet_probs",
    "vit.weights.h5": "vit_probs",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    torch.set_num_threads(parser.parse_args().threads)
    with np.load(FIXTURE / "expected.npz") as data:
        expected = dict(data)
    pixels = torch.from_numpy(expected["images_nhwc"]).permute(0, 3, 1, 2).contiguous()
    model_name, flags = cpu_info()
    print(
        f"cpu: {model_name} ({' '.join(flags) or 'no listed flags'}), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)"
    )
    for name, key in FILES.items():
        model = K.to_torch(K.read_keras_model(FIXTURE / name))
        with torch.no_grad():
            probs = model(pixels).softmax(dim=-1).numpy()
        print(f"{name}: max |p - p_keras| = {np.abs(probs - expected[key]).max():.2e}")


if __name__ == "__main__":
    main()
