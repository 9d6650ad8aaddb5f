"""The committed Keras fixtures (tests/fixtures/keras/) and how eanet is held against them.

Shared by tests/test_interop_keras.py (forward pass), tests/test_keras_training.py (10
training steps) and tools/record_checks.py, which records the figures those tests check.
The tolerances and the reasons for them are in the two tests' docstrings.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import pickle
import tarfile
from pathlib import Path

import numpy as np
import torch

from eanet import accel
from eanet.data.augment import AugmentConfig
from eanet.interop import keras as K
from eanet.models.registry import build_model
from eanet.train.config import TrainConfig
from eanet.train.step import make_optimizer, train_step

FIXTURE = Path(__file__).parent / "fixtures" / "keras"
SAMPLE = Path(__file__).parents[1] / "src" / "eanet" / "assets" / "cifar-100-sample.tar.gz"

# forward: tests/test_interop_keras.py
FORWARD_TOLERANCE = 1e-4
FILES = {  # file -> (expected probabilities, attention, trainable parameters)
    "eanet.weights.h5": ("eanet_probs", "external", 361_380),
    "eanet.keras": ("eanet_probs", "external", 361_380),
    "vit.weights.h5": ("vit_probs", "self", 623_268),
}

# training: tests/test_keras_training.py
TRAINING_TOLERANCE = 2e-5
LOSS_TOLERANCE = 1e-4  # relative; the losses are 7.6 to 15.3
STEPS, BATCH = 10, 48
TORCH_RULE_MARGIN = 20  # torch's epsilon rule must end more than 20x the tolerance away
NOISE_ONLY = ("norm1.bias", "attn.proj_in.bias", "attn.mk.bias")  # gradient 0: see that test


def load_fixture(name: str) -> dict[str, np.ndarray]:
    """A fixture's arrays: expected.npz (forward) or training.npz (the Keras trajectory)."""
    with np.load(FIXTURE / name) as data:
        return dict(data)


def keras_parameters() -> dict[str, int]:
    """The Keras model.summary() totals the forward fixture recorded, per model ('eanet', 'vit')."""
    provenance = json.loads((FIXTURE / "provenance.json").read_text(encoding="utf-8"))
    return {name: m["parameters"] for name, m in provenance["models"].items()}


def fixture_pixels(expected: dict[str, np.ndarray]) -> torch.Tensor:
    """The forward fixture's real CIFAR-100 images, NHWC uint8 -> NCHW."""
    return torch.from_numpy(expected["images_nhwc"]).permute(0, 3, 1, 2).contiguous()


def probs_of(model: torch.nn.Module | K.KerasModel, pixels: torch.Tensor) -> np.ndarray:
    """Softmax output of a torch model, or of a Keras file imported as one."""
    if isinstance(model, K.KerasModel):
        model = K.to_torch(model)
    with torch.no_grad():
        return model(pixels).softmax(dim=-1).numpy()


def prob_difference(model, pixels: torch.Tensor, keras_probs: np.ndarray) -> float:
    """Max |p - p_keras| over the images and classes."""
    return float(np.abs(probs_of(model, pixels) - keras_probs).max())


def keras_batches(keras_run: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 10 batches Keras trained on: the slice's first 480 training images, in order."""
    with tarfile.open(SAMPLE) as tar:
        train = pickle.load(tar.extractfile("cifar-100-python/train"), encoding="latin1")
    images = torch.from_numpy(np.asarray(train["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    labels = torch.as_tensor(train["fine_labels"])
    assert torch.equal(labels[: STEPS * BATCH], torch.from_numpy(keras_run["labels"]))
    return [(images[i : i + BATCH], labels[i : i + BATCH]) for i in range(0, STEPS * BATCH, BATCH)]


def mapped(keras_run: dict, prefix: str, folder: Path) -> dict[str, torch.Tensor]:
    """The recorded tensors under `prefix` (a Keras weights layout), as eanet's state dict."""
    import h5py

    path = folder / f"{prefix}.weights.h5"
    with h5py.File(path, "w") as f:
        for key, value in keras_run.items():
            if key.startswith(prefix + "/"):
                f.create_dataset(key[len(prefix) + 1 :], data=value)
    return {k: torch.from_numpy(np.array(v)) for k, v in K.read_keras_model(path).state.items()}


def start_model() -> torch.nn.Module:
    """The fixture's Keras weights in eanet's reference EANet, with dropout 0."""
    km = K.read_keras_model(FIXTURE / "eanet.weights.h5")
    config = dataclasses.replace(km.config, attn_drop=0.0, proj_drop=0.0, mlp_drop=0.0)
    model = build_model(config)
    model.load_state_dict(K.to_torch(km).state_dict())
    return model.train()


def train_like_keras(batches, rule: str, use_accel: bool, snapshots=(1, 5, 10)):
    """eanet's own make_optimizer + train_step over the batches; weights at each snapshot."""
    torch.manual_seed(0)
    model = start_model()
    if use_accel:
        accel.apply(model, "cpu", "fp32")
    cfg = TrainConfig(device="cpu", augment="none", adam_eps_rule=rule, batch_size=BATCH)
    optimizer = make_optimizer(model, cfg)
    losses, weights = [], {}
    for step, (x, y) in enumerate(batches, start=1):
        _, loss = train_step(model, optimizer, x, y, cfg, AugmentConfig())
        losses.append(float(loss))
        if step in snapshots:
            weights[step] = copy.deepcopy(model.state_dict())  # accel keeps the names
    return losses, weights, model, optimizer


def max_difference(ours: dict, theirs: dict) -> tuple[float, str]:
    """Largest |ours - theirs| over the trainable tensors Keras recorded, and where."""
    worst = (0.0, "")
    for key, value in theirs.items():
        if key.startswith("normalize.") or key.endswith(NOISE_ONLY):
            continue  # statistics, not trained; or a gradient of rounding noise only
        d = float((ours[key].float() - value.float()).abs().max())
        worst = max(worst, (d, key))
    return worst
