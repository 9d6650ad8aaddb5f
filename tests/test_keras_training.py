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
The fixture's loading and the comparison live in tests/keras_helpers.py, which
tools/record_checks.py uses to record the figures (benchmarks/results/fidelity/).
"""

from __future__ import annotations

import numpy as np
import pytest
from keras_helpers import (
    LOSS_TOLERANCE,
    NOISE_ONLY,
    TORCH_RULE_MARGIN,
    keras_batches,
    load_fixture,
    mapped,
    max_difference,
    train_like_keras,
)
from keras_helpers import TRAINING_TOLERANCE as TOLERANCE

pytest.importorskip("h5py")


@pytest.fixture(scope="module")
def keras_run() -> dict[str, np.ndarray]:
    return load_fixture("training.npz")


@pytest.fixture(scope="module")
def batches(keras_run):
    return keras_batches(keras_run)


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
    assert diff > TORCH_RULE_MARGIN * TOLERANCE, diff
