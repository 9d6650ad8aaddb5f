"""Training parity with Keras: eanet's optimizer and training step follow a trajectory that
Keras itself recorded (tools/make_keras_training_fixture.py, Keras 3.15.1 + TensorFlow 2.21).

From the same weights (the import-keras fixture), the reference EANet trains 10 steps of 48
real CIFAR-100 images with the example's compile (AdamW lr 1e-3, weight decay 1e-4, label
smoothing 0.1), dropout 0 and augmentation off on both sides.

Tolerance: float32 noise. After 10 steps, in which weights move by up to 1e-2, eanet's worst
tensor sits about a tenth of TOLERANCE = 2e-5 from Keras's, while torch's own epsilon
placement ends about 50x beyond it: that rule must fail the same check
(`test_torchs_epsilon_rule_is_not_kerass`). Left out: the three tensors of each block that
only shift every token of the external attention's input alike (norm1's bias, proj_in's
bias, the memory keys' bias): the softmax over tokens cancels such a shift, so their true
gradient is 0 and Adam moves them, on both sides, by amplified rounding noise alone.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from eanet import accel
from eanet.data.augment import AugmentConfig
from eanet.interop import keras as K
from eanet.models.registry import build_model
from eanet.train.config import TrainConfig
from eanet.train.step import make_optimizer, train_step

h5py = pytest.importorskip("h5py")

FIXTURE = Path(__file__).parent / "fixtures" / "keras"
SAMPLE = Path(__file__).parents[1] / "src" / "eanet" / "assets" / "cifar-100-sample.tar.gz"
TOLERANCE = 2e-5
LOSS_TOLERANCE = 1e-4  # relative; the losses are 7.6 to 15.3
STEPS, BATCH = 10, 48
NOISE_ONLY = ("norm1.bias", "attn.proj_in.bias", "attn.mk.bias")  # gradient 0: docstring


@pytest.fixture(scope="module")
def keras_run() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "training.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def batches(keras_run) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The 10 batches Keras trained on: the slice's first 480 training images, in order."""
    with tarfile.open(SAMPLE) as tar:
        train = pickle.load(tar.extractfile("cifar-100-python/train"), encoding="latin1")
    images = torch.from_numpy(np.asarray(train["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
    labels = torch.as_tensor(train["fine_labels"])
    assert torch.equal(labels[: STEPS * BATCH], torch.from_numpy(keras_run["labels"]))
    return [(images[i : i + BATCH], labels[i : i + BATCH]) for i in range(0, STEPS * BATCH, BATCH)]


def mapped(keras_run: dict, prefix: str, tmp_path: Path) -> dict[str, torch.Tensor]:
    """The recorded tensors under `prefix` (a Keras weights layout), as eanet's state dict."""
    path = tmp_path / f"{prefix}.weights.h5"
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


@pytest.mark.slow
@pytest.mark.parametrize("use_accel", [False, True], ids=["plain", "accel"])
def test_ten_steps_end_where_keras_ended(keras_run, batches, tmp_path, use_accel):
    losses, weights, model, optimizer = train_like_keras(batches, "keras", use_accel)
    keras_losses = keras_run["losses"]
    assert np.allclose(losses, keras_losses, rtol=LOSS_TOLERANCE, atol=0), (losses, keras_losses)
    for step in (1, 5, 10):
        diff, where = max_difference(weights[step], mapped(keras_run, f"w{step}", tmp_path))
        assert diff < TOLERANCE, (step, where, diff)
    # Adam's moments after step 10: the same m and v (v ~ g^2 is tiny: compared relatively)
    for slot, keras_slot in (("exp_avg", "m10"), ("exp_avg_sq", "v10")):
        theirs = mapped(keras_run, keras_slot, tmp_path)
        for name, p in model.named_parameters():
            if name.endswith(NOISE_ONLY):
                continue
            ours, ref = optimizer.state[p][slot], theirs[name]
            assert (ours - ref).abs().max() <= 1e-3 * ref.abs().max() + 1e-12, (slot, name)


@pytest.mark.slow
def test_torchs_epsilon_rule_is_not_kerass(keras_run, batches, tmp_path):
    """The check above has teeth: torch's AdamW rule, everything else equal, fails it."""
    _, weights, _, _ = train_like_keras(batches, "torch", False, snapshots=(10,))
    diff, _ = max_difference(weights[10], mapped(keras_run, "w10", tmp_path))
    assert diff > 20 * TOLERANCE, diff
