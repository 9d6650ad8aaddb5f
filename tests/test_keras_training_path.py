"""eanet's training path against Keras 3's own code, piece by piece (docs/reference.md, §6).

No Keras here: each test transcribes what a Keras 3.15.1 layer or trainer computes (its
formula, its constants, the matrix it builds, how TensorFlow samples with it) and checks
eanet's function against it. `tools/keras_augment_stats.py` measured the same against Keras
itself. Two tests pin differences that docs/reference.md §6 names (the contrast range and the
validation split of sizes that are not a multiple of 5); change them together with it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from eanet.data.augment import (
    AugmentConfig,
    AugmentParams,
    affine_matrices,
    apply_contrast,
    apply_geometry,
    sample_params,
)
from eanet.data.dataset import ImageData
from eanet.data.splits import compute_normalization, split_validation
from eanet.metrics import MetricSums
from eanet.train import step as step_mod
from eanet.train.config import TrainConfig
from eanet.train.loop import build_for_data

# ---------------------------------------------------------------- transcriptions of Keras 3


def keras_split_at(n: int, validation_split: float) -> int:
    """keras/src/trainers/data_adapters/array_slicing.py train_validation_split: the cut."""
    return int(math.floor(n * (1.0 - validation_split)))


def keras_rotation_matrix(degrees: float, h: int, w: int) -> np.ndarray:
    """RandomRotation: `_compute_affine_matrix` with centre 0.5, scale 1, no shear or shift.

    Maps an output pixel (x, y), integer at pixel centres, to the input position it reads.
    """
    t = math.radians(degrees)
    cx, cy = 0.5 * (w - 1), 0.5 * (h - 1)
    a0, a1, b0, b1 = math.cos(t), -math.sin(t), math.sin(t), math.cos(t)
    return np.array([[a0, a1, cx - cx * a0 - cy * a1], [b0, b1, cy - cx * b0 - cy * b1]])


def keras_zoom_matrix(zoom_h: float, zoom_w: float, h: int, w: int) -> np.ndarray:
    """RandomZoom `_get_zoom_matrix`: the zoom drawn in [1 + lower, 1 + upper] scales positions."""
    return np.array(
        [
            [zoom_w, 0.0, (w - 1) / 2.0 * (1.0 - zoom_w)],
            [0.0, zoom_h, (h - 1) / 2.0 * (1.0 - zoom_h)],
        ]
    )


def reflect(c: np.ndarray, n: int) -> np.ndarray:
    """TensorFlow's FILL_REFLECT (d c b a | a b c d | d c b a), then its clamp to [0, n - 1]."""
    m = np.mod(c + 0.5, 2 * n)
    m = np.where(m >= n, 2 * n - m, m)
    return np.clip(m - 0.5, 0, n - 1)


def tf_affine_transform(img: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """ImageProjectiveTransformV3, bilinear, reflect: what Keras's affine_transform runs. HWC."""
    h, w = img.shape[:2]
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    xi = reflect(matrix[0, 0] * xs + matrix[0, 1] * ys + matrix[0, 2], w)
    yi = reflect(matrix[1, 0] * xs + matrix[1, 1] * ys + matrix[1, 2], h)
    x0, y0 = np.floor(xi).astype(int), np.floor(yi).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (xi - x0)[..., None], (yi - y0)[..., None]
    top = img[y0, x0] * (1 - fx) + img[y0, x1] * fx
    bottom = img[y1, x0] * (1 - fx) + img[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def keras_contrast_range(factor: float) -> tuple[float, float]:
    """RandomContrast(factor): `_set_factor` with _FACTOR_BOUNDS (0, 1), then [1 - lo, 1 + hi]."""
    lower, upper = max(-abs(factor), 0.0), abs(factor)
    return 1.0 - lower, 1.0 + upper


def keras_soft_target_loss(logits: torch.Tensor, labels: torch.Tensor, ls: float) -> torch.Tensor:
    """CategoricalCrossentropy(label_smoothing=ls) on the softmax's cached logits."""
    k = logits.shape[1]
    target = F.one_hot(labels, k).double() * (1.0 - ls) + ls / k
    return -(target * logits.double().log_softmax(dim=1)).sum(dim=1).mean()


# ---------------------------------------------------------------- helpers


def eanet_resample(img: np.ndarray, flip=False, degrees=0.0, zoom_h=1.0, zoom_w=1.0) -> np.ndarray:
    """eanet's one resample of an HWC float image with one set of parameters."""
    params = AugmentParams(
        flip=torch.tensor([flip]),
        angle=torch.tensor([math.radians(degrees)]),
        zoom_h=torch.tensor([zoom_h]),
        zoom_w=torch.tensor([zoom_w]),
        contrast=torch.ones(1),
    )
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float()
    out = apply_geometry(x, affine_matrices(params, x.shape[-2], x.shape[-1]))
    return out[0].permute(1, 2, 0).double().numpy()


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (32, 32, 3))


# ---------------------------------------------------------------- validation split


def test_validation_split_is_the_last_20_percent_unshuffled() -> None:
    n = 50_000
    idx = torch.arange(n)
    train_x, train_y, val_x, val_y = split_validation(idx, idx, 0.2)
    cut = keras_split_at(n, 0.2)
    assert cut == 40_000 and math.ceil(cut / 128) == 313
    assert torch.equal(train_x, idx[:cut]) and torch.equal(train_y, idx[:cut])
    assert torch.equal(val_x, idx[cut:]) and torch.equal(val_y, idx[cut:])


@pytest.mark.parametrize("n", [50_000, 60_000, 10, 1000, 4995])
def test_validation_split_sizes_match_keras_when_n_is_a_multiple_of_5(n: int) -> None:
    assert len(split_validation(torch.arange(n), torch.arange(n), 0.2)[0]) == keras_split_at(n, 0.2)


@pytest.mark.parametrize(("n", "keras_val"), [(486, 98), (1797, 360), (437, 88)])
def test_validation_split_is_kerass_when_n_times_fraction_is_fractional(n: int, keras_val: int):
    # Keras keeps floor(N * 0.8) for training, the rest validates (docs section 6).
    assert n - keras_split_at(n, 0.2) == keras_val
    assert len(split_validation(torch.arange(n), torch.arange(n), 0.2)[2]) == keras_val


# ---------------------------------------------------------------- normalization statistics


def test_statistics_are_numpys_mean_and_var_over_the_array() -> None:
    images = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator())
    mean, var, count = compute_normalization(images, batch=10)
    nhwc = images.permute(0, 2, 3, 1).numpy()
    # Normalization.adapt on a numpy array: np.mean and np.var over every axis but the last.
    np.testing.assert_allclose(mean.numpy(), np.mean(nhwc, axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(var.numpy(), np.var(nhwc, axis=(0, 1, 2)), rtol=1e-6)
    assert count == 64 * 8 * 8


def test_normalization_is_adapted_on_every_training_image_validation_included() -> None:
    g = torch.Generator().manual_seed(1)
    train = torch.randint(0, 128, (40, 3, 32, 32), dtype=torch.uint8, generator=g)
    train[32:] += 120  # the 20% tail that becomes validation is brighter
    data = ImageData(
        "tiny", [f"c{i}" for i in range(4)], train, torch.arange(40) % 4, train[:4], torch.zeros(4)
    )
    model = build_for_data(TrainConfig(), data)
    whole, _, _ = compute_normalization(train)
    head, _, _ = compute_normalization(train[:32])
    assert torch.allclose(model.normalize.mean, whole)  # as `adapt(x_train)`: all 50,000
    assert not torch.allclose(model.normalize.mean, head, atol=1.0)


# ---------------------------------------------------------------- loss


def test_label_smoothing_is_kerass_formula() -> None:
    assert TrainConfig().label_smoothing == 0.1
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(64, 100, generator=g) * 4
    labels = torch.randint(0, 100, (64,), generator=g)
    ours = F.cross_entropy(logits, labels, label_smoothing=0.1)
    assert math.isclose(
        float(ours), float(keras_soft_target_loss(logits, labels, 0.1)), rel_tol=1e-6
    )


def test_no_probability_clipping_like_keras_on_a_softmax_output() -> None:
    # Keras's Dense(softmax) caches its logits and the loss uses them, so the 1e-7 clip of
    # `categorical_crossentropy` on probabilities never applies: for these logits Keras's
    # train_on_batch and evaluate both gave 4.050000 (tools/keras_augment_stats.py, 4a);
    # clipping would have given 1.450629.
    logits = torch.zeros(2, 10)
    logits[0, 0], logits[1, 3] = 60.0, 30.0
    loss = F.cross_entropy(logits, torch.tensor([0, 3]), label_smoothing=0.1)
    assert math.isclose(float(loss), 4.05, rel_tol=1e-6)


# ---------------------------------------------------------------- augmentation


def test_rotation_range_is_a_tenth_of_a_turn() -> None:
    cfg = AugmentConfig()
    assert math.isclose(math.degrees(cfg.rotation * 2 * math.pi), 0.1 * 360.0)  # Keras: degrees
    angles = sample_params(20_000, cfg, "cpu", torch.Generator().manual_seed(3)).angle
    assert angles.abs().max() <= 0.1 * 2 * math.pi and angles.abs().max() > 0.99 * 0.2 * math.pi


def test_zoom_range_is_one_plus_the_factor() -> None:
    p = sample_params(20_000, AugmentConfig(), "cpu", torch.Generator().manual_seed(4))
    for z in (p.zoom_h, p.zoom_w):  # Keras: uniform in [1 + (-0.2), 1 + 0.2], > 1 zooms out
        assert 0.8 <= float(z.min()) < 0.801 and 1.199 < float(z.max()) <= 1.2


def test_contrast_range_is_not_keras_3s() -> None:
    # Known difference (docs §6): Keras 3.15.1 clamps the lower factor to 0, so
    # RandomContrast(0.1) only raises contrast, [1.0, 1.1]; eanet draws [0.9, 1.1] as the
    # layer's docstring and the TF2 version of the example do.
    assert keras_contrast_range(0.1) == (1.0, 1.1)
    c = sample_params(20_000, AugmentConfig(), "cpu", torch.Generator().manual_seed(5)).contrast
    assert float(c.min()) < 0.901 and float(c.max()) > 1.099


def test_contrast_formula_is_kerass(image: np.ndarray) -> None:
    batch = np.stack([image, image * 0.5 + 100])
    factor = np.array([1.1, 0.9])
    mean = batch.mean(axis=1, keepdims=True).mean(axis=2, keepdims=True)  # per image, channel
    expected = np.clip((batch - mean) * factor[:, None, None, None] + mean, 0, 255)
    x = torch.from_numpy(batch).permute(0, 3, 1, 2)
    got = apply_contrast(x, torch.from_numpy(factor)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_reflect_fill_is_tensorflows(image: np.ndarray) -> None:
    n = 5
    assert reflect(np.arange(-6, 11, dtype=float), n).tolist() == [
        *[4, 4, 3, 2, 1, 0, 0, 1, 2, 3, 4, 4, 3, 2, 1, 0, 0]
    ]
    # A shift by 3.25 pixels right and 1.5 up reads far into the fill, bilinearly.
    shift = np.array([[1.0, 0.0, -3.25], [0.0, 1.0, 1.5]])
    theta = torch.tensor([[[1.0, 0.0, -3.25 * 2 / 32], [0.0, 1.0, 1.5 * 2 / 32]]])
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    got = apply_geometry(x, theta)[0].permute(1, 2, 0).double().numpy()
    np.testing.assert_allclose(got, tf_affine_transform(image, shift), atol=1e-3)


def test_flip_is_exact(image: np.ndarray) -> None:
    np.testing.assert_allclose(eanet_resample(image, flip=True), image[:, ::-1], atol=1e-4)


@pytest.mark.parametrize("degrees", [-36.0, -7.5, 3.0, 36.0])
def test_rotation_samples_where_kerass_matrix_does(image: np.ndarray, degrees: float) -> None:
    expected = tf_affine_transform(image, keras_rotation_matrix(degrees, 32, 32))
    np.testing.assert_allclose(eanet_resample(image, degrees=degrees), expected, atol=2e-3)


@pytest.mark.parametrize(("zoom_h", "zoom_w"), [(0.8, 1.2), (1.2, 0.8), (0.9, 0.95), (1.1, 1.0)])
def test_zoom_samples_where_kerass_matrix_does(image: np.ndarray, zoom_h, zoom_w) -> None:
    expected = tf_affine_transform(image, keras_zoom_matrix(zoom_h, zoom_w, 32, 32))
    got = eanet_resample(image, zoom_h=zoom_h, zoom_w=zoom_w)
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_one_resample_is_the_chain_in_the_interior_up_to_interpolation(image: np.ndarray) -> None:
    # Different on purpose: Keras resamples twice (rotation, then zoom), eanet once. Where
    # both read the original image the two differ by interpolation only, on a smooth image
    # hardly at all.
    ys, xs = np.mgrid[0:32, 0:32]
    smooth = np.stack([xs * 4.0, ys * 3.0 + 20, (xs + ys) * 2.0], axis=-1)
    chain = tf_affine_transform(smooth, keras_rotation_matrix(10.0, 32, 32))
    chain = tf_affine_transform(chain, keras_zoom_matrix(0.9, 0.9, 32, 32))
    once = eanet_resample(smooth, degrees=10.0, zoom_h=0.9, zoom_w=0.9)
    np.testing.assert_allclose(once[8:24, 8:24], chain[8:24, 8:24], atol=1e-3)


# ---------------------------------------------------------------- epochs and batches


def test_each_epoch_is_a_fresh_permutation_with_a_partial_last_batch(monkeypatch) -> None:
    seen: list[torch.Tensor] = []

    def fake_step(model, optimizer, x, y, cfg, aug, *args):
        seen.append(y.clone())
        return torch.zeros(len(y), 10), torch.zeros(())

    monkeypatch.setattr(step_mod, "train_step", fake_step)
    n = 40_000
    images = torch.zeros(n, 1, 1, 1, dtype=torch.uint8)
    labels = torch.arange(n)
    epochs = []
    for _ in range(2):
        seen.clear()
        step_mod.train_epoch(
            torch.nn.Identity(), None, images, labels, TrainConfig(), progress=False
        )
        assert [len(b) for b in seen] == [128] * 312 + [64]  # Keras: ceil, partial batch kept
        order = torch.cat(seen)
        assert torch.equal(order.sort().values, labels)
        epochs.append(order)
    assert not torch.equal(epochs[0], epochs[1])  # Keras fit(shuffle=True): new order per epoch


# ---------------------------------------------------------------- metrics


def test_top1_and_top5_are_kerass_without_ties() -> None:
    g = torch.Generator().manual_seed(6)
    logits = torch.randn(256, 100, generator=g)
    labels = torch.randint(0, 100, (256,), generator=g)
    sums = MetricSums(torch.device("cpu"))
    sums.add(logits, labels, torch.zeros(()))
    probs = logits.softmax(dim=1)  # Keras's metrics see the softmax output
    top1 = (probs.argmax(dim=1) == labels).double().mean()
    # tf.math.in_top_k: a hit when fewer than k classes score strictly higher
    higher = (probs > probs.gather(1, labels[:, None])).sum(dim=1)
    top5 = (higher < 5).double().mean()
    m = sums.result()
    assert m.top1 == float(top1) and m.top5 == float(top5)
