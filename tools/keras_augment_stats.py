"""Measure eanet's training path against Keras 3's own layers: the numbers of docs/reference.md §6.

Run in a Keras 3 environment that also has torch (eanet's augmentation is imported from src/):

    KERAS_BACKEND=tensorflow python tools/keras_augment_stats.py   # Keras 3.15.1, TF 2.21

Everything runs on the first N_IMAGES training images of the CIFAR-100 slice shipped with
eanet, one thread, in a few seconds. Keras's layers are driven through their own
`transform_images` with fixed parameters (the example's layers, built as it builds them), so
both sides see the same flip, angle, zoom and contrast factor per image:

1. each geometric layer alone against eanet's one resample with the same parameter (are the
   conventions the same: angle sign, centre, zoom direction, reflect fill, bilinear?);
2. the whole chain (flip, rotation, contrast, zoom: two resamples) against eanet (one resample,
   then contrast): how far apart, and how much high-frequency energy each keeps;
3. the random draws of the four layers (ranges, independence);
4. the loss Keras computes for the example's softmax output (clipped probabilities or logits?),
   the validation split sizes, the Normalization statistics, and the top-k tie rule.
"""

from __future__ import annotations

import os
import pickle
import sys
import tarfile
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402
from keras import layers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from eanet.data.augment import (  # noqa: E402
    AugmentConfig,
    AugmentParams,
    affine_matrices,
    apply_contrast,
    apply_geometry,
    sample_params,
)
from eanet.data.splits import compute_normalization, split_validation  # noqa: E402

SAMPLE = ROOT / "src" / "eanet" / "assets" / "cifar-100-sample.tar.gz"
N_IMAGES = 256
SEED = 0
DRAWS = 20_000


def load_images(n: int) -> np.ndarray:
    """The slice's first n training images, float32 NHWC in 0..255."""
    with tarfile.open(SAMPLE) as tar:
        train = pickle.load(tar.extractfile("cifar-100-python/train"), encoding="latin1")
    data = np.asarray(train["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data[:n].transpose(0, 2, 3, 1).astype(np.float32)


class KerasChain:
    """The example's four random layers, applied with given per-image parameters."""

    def __init__(self) -> None:
        self.flip = layers.RandomFlip("horizontal")
        self.rot = layers.RandomRotation(factor=0.1)
        self.contrast = layers.RandomContrast(factor=0.1)
        self.zoom = layers.RandomZoom(height_factor=0.2, width_factor=0.2)

    def do_flip(self, x: np.ndarray, flips: np.ndarray) -> np.ndarray:
        t = {"flips": flips[:, None, None, None], "input_shape": x.shape}
        return np.asarray(self.flip.transform_images(x, t, training=True))

    def do_rot(self, x: np.ndarray, degrees: np.ndarray) -> np.ndarray:
        n, h, w = x.shape[:3]
        zeros, ones = np.zeros(n, np.float32), np.ones(n, np.float32)
        m = self.rot._compute_affine_matrix(
            0.5, 0.5, degrees.astype(np.float32), zeros, zeros, ones, zeros, zeros, h, w
        )
        return np.asarray(self.rot.transform_images(x, {"rotation_matrix": m}, training=True))

    def do_contrast(self, x: np.ndarray, factor: np.ndarray) -> np.ndarray:
        t = {"contrast_factor": factor[:, None, None, None].astype(np.float32)}
        return np.asarray(self.contrast.transform_images(x, t, training=True))

    def do_zoom(self, x: np.ndarray, zh: np.ndarray, zw: np.ndarray) -> np.ndarray:
        t = {"height_zoom": zh[:, None], "width_zoom": zw[:, None], "input_shape": x.shape}
        return np.asarray(self.zoom.transform_images(x, t, training=True))

    def all(self, x, flips, degrees, factor, zh, zw) -> np.ndarray:
        x = self.do_flip(x, flips)
        x = self.do_rot(x, degrees)
        x = self.do_contrast(x, factor)
        return self.do_zoom(x, zh, zw)


def eanet_geometry(x: np.ndarray, flips, degrees, zh, zw, factor=None) -> np.ndarray:
    """eanet's one resample (then its contrast when `factor` is given), NHWC in and out."""
    n = len(x)
    params = AugmentParams(
        flip=torch.from_numpy(flips),
        angle=torch.from_numpy(np.deg2rad(degrees).astype(np.float32)),
        zoom_h=torch.from_numpy(zh.astype(np.float32)),
        zoom_w=torch.from_numpy(zw.astype(np.float32)),
        contrast=torch.ones(n) if factor is None else torch.from_numpy(factor.astype(np.float32)),
    )
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    out = apply_geometry(xt, affine_matrices(params, xt.shape[-2], xt.shape[-1]))
    if factor is not None:
        out = apply_contrast(out, params.contrast)
    return out.permute(0, 2, 3, 1).numpy()


def same_source_mask(flips, degrees, zh, zw, h: int, w: int) -> np.ndarray:
    """NHWC mask: the composed and the zoom-only sampling positions both fall inside the image.

    There both pipelines read the original pixels (Keras through an intermediate rotated image,
    eanet directly), so their difference is interpolation alone; elsewhere the fill differs.
    """
    n = len(flips)

    def positions(zero_angle: bool) -> torch.Tensor:
        params = AugmentParams(
            flip=torch.zeros(n, dtype=torch.bool) if zero_angle else torch.from_numpy(flips),
            angle=torch.zeros(n) if zero_angle else torch.from_numpy(np.deg2rad(degrees)),
            zoom_h=torch.from_numpy(zh),
            zoom_w=torch.from_numpy(zw),
            contrast=torch.ones(n),
        )
        grid = torch.nn.functional.affine_grid(
            affine_matrices(params, h, w), [n, 1, h, w], align_corners=False
        )
        return grid.abs().amax(dim=-1) <= 1.0 - 1.0 / w  # within the outer pixel centres

    mask = positions(False) & positions(True)
    return mask.numpy()[..., None].repeat(3, axis=-1)


def hf_energy(x: np.ndarray) -> float:
    """Mean squared 4-neighbour Laplacian over the interior pixels (high-frequency energy)."""
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(np.mean(lap.astype(np.float64) ** 2))


def mad(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.mean()), float(d.max())


def geometry_report(x: np.ndarray, chain: KerasChain, rng: np.random.Generator) -> None:
    n = len(x)
    flips = rng.random(n) < 0.5
    degrees = rng.uniform(-36.0, 36.0, n)
    zh, zw = rng.uniform(0.8, 1.2, n), rng.uniform(0.8, 1.2, n)
    factor = rng.uniform(0.9, 1.1, n)
    none, one = np.zeros(n, bool), np.ones(n)
    zero = np.zeros(n)
    print(f"1. one layer alone vs eanet's resample, {n} images, |difference| in 0..255 (mean, max)")
    cases = {
        "flip": (chain.do_flip(x, flips), eanet_geometry(x, flips, zero, one, one)),
        "rotation +-36 deg": (chain.do_rot(x, degrees), eanet_geometry(x, none, degrees, one, one)),
        "zoom 0.8..1.2": (chain.do_zoom(x, zh, zw), eanet_geometry(x, none, zero, zh, zw)),
        "contrast": (
            chain.do_contrast(x, factor),
            eanet_geometry(x, none, zero, one, one, factor),
        ),
    }
    for name, (k, e) in cases.items():
        print(f"   {name:18s} mean {mad(k, e)[0]:.2e}  max {mad(k, e)[1]:.2e}")

    print("2. whole chain: Keras flip, rotate, contrast, zoom vs eanet one resample + contrast")
    base = hf_energy(x)
    k_geo = chain.do_zoom(chain.do_rot(chain.do_flip(x, flips), degrees), zh, zw)
    e_geo = eanet_geometry(x, flips, degrees, zh, zw)
    print(
        f"   geometry only    |Keras - eanet| mean {mad(k_geo, e_geo)[0]:.2f} max "
        f"{mad(k_geo, e_geo)[1]:.1f}"
    )
    print(
        f"   high-frequency energy / original: Keras {hf_energy(k_geo) / base:.3f}, "
        f"eanet {hf_energy(e_geo) / base:.3f}"
    )
    inside = same_source_mask(flips, degrees, zh, zw, x.shape[1], x.shape[2])
    d = np.abs(k_geo.astype(np.float64) - e_geo)
    print(
        f"   pixels where both sample inside the original image: {inside.mean():.1%}; "
        f"there |Keras - eanet| mean {d[inside].mean():.2f}, elsewhere (the fill: Keras "
        f"reflects the rotated frame, eanet the original image) {d[~inside].mean():.2f}"
    )
    k_all = chain.all(x, flips, degrees, factor, zh, zw)
    e_all = eanet_geometry(x, flips, degrees, zh, zw, factor)
    print(
        f"   with contrast    |Keras - eanet| mean {mad(k_all, e_all)[0]:.2f} max "
        f"{mad(k_all, e_all)[1]:.1f}"
    )
    # A near-identity transform: 2 degrees and a 2% zoom, where the only loss is interpolation.
    small_deg, small_z = np.full(n, 2.0), np.full(n, 1.02)
    k_small = chain.do_zoom(chain.do_rot(x, small_deg), small_z, small_z)
    e_small = eanet_geometry(x, none, small_deg, small_z, small_z)
    print(
        f"   2 deg + zoom 1.02: high-frequency energy / original: Keras "
        f"{hf_energy(k_small) / base:.3f}, eanet {hf_energy(e_small) / base:.3f}; "
        f"|Keras - eanet| mean {mad(k_small, e_small)[0]:.2f}"
    )


def draws_report(x: np.ndarray, chain: KerasChain) -> None:
    print(f"3. random draws, {DRAWS} per layer (Keras) and per parameter (eanet)")
    batch = np.zeros((DRAWS, 1, 1, 3), np.float32)
    f = np.asarray(chain.contrast.get_random_transformation(batch)["contrast_factor"]).ravel()
    a = np.asarray(chain.rot.get_random_transformation(batch)["angle"])
    z = chain.zoom.get_random_transformation(batch)
    zh, zw = np.asarray(z["height_zoom"]).ravel(), np.asarray(z["width_zoom"]).ravel()
    fl = np.asarray(chain.flip.get_random_transformation(batch)["flips"]).ravel()
    p = sample_params(DRAWS, AugmentConfig(), "cpu", torch.Generator().manual_seed(SEED))
    ec, ea = p.contrast.numpy(), np.rad2deg(p.angle.numpy())
    print(
        f"   RandomContrast(0.1).factor = {chain.contrast.factor}; "
        f"Keras factor {f.min():.4f}..{f.max():.4f} mean {f.mean():.4f}; "
        f"eanet {ec.min():.4f}..{ec.max():.4f} mean {ec.mean():.4f}"
    )
    print(
        f"   rotation degrees: Keras {a.min():.2f}..{a.max():.2f}; "
        f"eanet {ea.min():.2f}..{ea.max():.2f}"
    )
    print(
        f"   zoom: Keras h {zh.min():.3f}..{zh.max():.3f} w {zw.min():.3f}..{zw.max():.3f} "
        f"corr(h, w) {np.corrcoef(zh, zw)[0, 1]:+.3f}; eanet h {p.zoom_h.min():.3f}.."
        f"{p.zoom_h.max():.3f} corr {np.corrcoef(p.zoom_h, p.zoom_w)[0, 1]:+.3f}"
    )
    print(f"   flip rate: Keras {fl.mean():.4f}, eanet {p.flip.float().mean():.4f}")
    # What the contrast range does to the images: the mean per-image channel std after it.
    std0 = x.std(axis=(1, 2)).mean()
    n = len(x)
    rng = np.random.default_rng(SEED)
    k_std = chain.do_contrast(x, rng.uniform(1.0, 1.1, n)).std(axis=(1, 2)).mean()
    e_std = chain.do_contrast(x, rng.uniform(0.9, 1.1, n)).std(axis=(1, 2)).mean()
    print(
        f"   per-image channel std after contrast / before: Keras range {k_std / std0:.4f}, "
        f"eanet range {e_std / std0:.4f}"
    )


def loss_report() -> None:
    print("4a. the example's loss on a softmax output, probabilities below 1e-7")
    k = 10
    inp = layers.Input((k,))
    out = layers.Dense(k, activation="softmax", use_bias=False)(inp)
    model = keras.Model(inp, out)
    model.layers[-1].set_weights([np.eye(k, dtype="float32")])
    x = np.zeros((2, k), "float32")
    x[0, 0], x[1, 3] = 60.0, 30.0  # the logits are x: wrong classes get e^-60 and e^-30
    y = np.zeros((2, k), "float32")
    y[0, 0], y[1, 3] = 1.0, 1.0
    model.compile(
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
        optimizer=keras.optimizers.SGD(0.0),
    )
    logits = torch.from_numpy(x)
    exact = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3]), label_smoothing=0.1)
    target = y * 0.9 + 0.1 / k
    probs = np.clip(torch.softmax(logits, 1).numpy().astype(np.float64), 1e-7, 1 - 1e-7)
    clipped = -(target * np.log(probs)).sum(1).mean()
    print(
        f"    F.cross_entropy(label_smoothing=0.1) {float(exact):.6f}; clipped-probability "
        f"formula {clipped:.6f}; Keras train_on_batch {float(model.train_on_batch(x, y)):.6f}; "
        f"Keras evaluate {model.evaluate(x, y, verbose=0):.6f}"
    )


def split_norm_ties_report(x: np.ndarray) -> None:
    from keras.src.trainers.data_adapters import array_slicing

    print("4b. validation split sizes (train, validation): Keras vs eanet")
    for n in (50_000, 60_000, 486, 1797):
        arr = np.arange(n)
        (ktr,), (kva,) = array_slicing.train_validation_split((arr,), validation_split=0.2)
        t = torch.arange(n)
        etr, _, eva, _ = split_validation(t, t, 0.2)
        same = np.array_equal(kva, eva.numpy()) and np.array_equal(ktr, etr.numpy())
        print(
            f"    N={n}: Keras ({len(ktr)}, {len(kva)}), eanet ({len(etr)}, {len(eva)}), "
            f"same indices: {same}"
        )
    print("4c. Normalization.adapt vs compute_normalization on the same uint8 images")
    u8 = x.astype(np.uint8)
    norm = layers.Normalization()
    norm.adapt(u8)
    mean, var, _ = compute_normalization(torch.from_numpy(u8).permute(0, 3, 1, 2).contiguous())
    km, kv = np.asarray(norm.mean).ravel(), np.asarray(norm.variance).ravel()
    print(
        f"    max relative difference: mean {np.max(np.abs(km - mean.numpy()) / km):.1e}, "
        f"variance {np.max(np.abs(kv - var.numpy()) / kv):.1e}"
    )
    print("4d. ties: label 5, six classes tied at the top")
    pred = np.array([[0.1] * 6 + [0.0] * 4], np.float32)
    label = np.array([5])
    k_top5 = bool(tf.math.in_top_k(label, pred, 5).numpy()[0])
    e_top5 = bool((torch.from_numpy(pred).topk(5, dim=1).indices == 5).any())
    k_top1 = int(np.argmax(pred))
    e_top1 = int(torch.from_numpy(pred).topk(1, dim=1).indices[0, 0])
    print(
        f"    Keras in_top_k {k_top5}, eanet topk-hit {e_top5}; "
        f"top-1 index: Keras argmax {k_top1}, eanet topk {e_top1}"
    )


def main() -> None:
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    torch.set_num_threads(1)
    print(f"Keras {keras.__version__}, TensorFlow {tf.__version__}, torch {torch.__version__}")
    x = load_images(N_IMAGES)
    chain = KerasChain()
    geometry_report(x, chain, np.random.default_rng(SEED))
    draws_report(x, chain)
    loss_report()
    split_norm_ties_report(x)


if __name__ == "__main__":
    main()
