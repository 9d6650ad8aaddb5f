"""Tests of the batched augmentation: distributions, exact geometry, fill, contrast, the bug."""

import math

import pytest
import torch

from eanet.data.augment import (
    AugmentConfig,
    AugmentParams,
    affine_matrices,
    apply_contrast,
    apply_geometry,
    augment,
    augment_reference_bug,
    sample_params,
)
from eanet.errors import ConfigError

N = 20_000
MAX_ANGLE = 0.1 * 2 * math.pi  # 36 degrees
# Exact geometric cases on 0..255 images: float32 grid coordinates are off by ~5e-6 pixel, which
# times a pixel-to-pixel step of up to 255 gives ~1e-3; 2e-3 is still 8e-6 of the pixel range.
EXACT = {"atol": 2e-3, "rtol": 0}


def make_params(b=1, flip=False, angle=0.0, zoom_h=1.0, zoom_w=1.0, contrast=1.0):
    """Hand-built parameters, no randomness."""
    return AugmentParams(
        flip=torch.full((b,), flip, dtype=torch.bool),
        angle=torch.full((b,), angle),
        zoom_h=torch.full((b,), zoom_h),
        zoom_w=torch.full((b,), zoom_w),
        contrast=torch.full((b,), contrast),
    )


def geometry(x, **kw):
    params = make_params(x.shape[0], **kw)
    return apply_geometry(x, affine_matrices(params, x.shape[-2], x.shape[-1]))


def rand_image(*shape, seed=0, low=0.0, high=255.0):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(shape, generator=g)


@pytest.fixture(scope="module")
def drawn():
    return sample_params(N, AugmentConfig(), "cpu", torch.Generator().manual_seed(1234))


# -- sampling -------------------------------------------------------------------------------


def test_sample_params_shapes_and_dtypes(drawn):
    assert drawn.flip.dtype == torch.bool
    for t in (drawn.angle, drawn.zoom_h, drawn.zoom_w, drawn.contrast):
        assert t.shape == (N,) and t.dtype == torch.float32


def test_flip_rate_is_one_half(drawn):
    rate = drawn.flip.float().mean().item()
    assert abs(rate - 0.5) < 5 * math.sqrt(0.25 / N)


def test_angle_uniform_within_36_degrees(drawn):
    a = drawn.angle
    assert a.abs().max() <= MAX_ANGLE + 1e-6
    assert a.min() < -MAX_ANGLE + 0.01 and a.max() > MAX_ANGLE - 0.01
    std = MAX_ANGLE / math.sqrt(3)
    assert abs(a.mean().item()) < 5 * std / math.sqrt(N)
    counts = torch.histc(a, bins=10, min=-MAX_ANGLE, max=MAX_ANGLE)
    expected = N / 10
    assert (counts - expected).abs().max() < 5 * math.sqrt(expected)


def test_zoom_ranges_and_independence(drawn):
    for z in (drawn.zoom_h, drawn.zoom_w):
        assert z.min() >= 0.8 - 1e-6 and z.max() <= 1.2 + 1e-6
        assert z.min() < 0.81 and z.max() > 1.19
    corr = torch.corrcoef(torch.stack([drawn.zoom_h, drawn.zoom_w]))[0, 1].item()
    assert abs(corr) < 5 / math.sqrt(N)


def test_contrast_range(drawn):
    c = drawn.contrast
    assert c.min() >= 0.9 - 1e-6 and c.max() <= 1.1 + 1e-6
    assert c.min() < 0.905 and c.max() > 1.095


def test_disabled_config_draws_identity():
    cfg = AugmentConfig(flip=False, rotation=0.0, contrast=0.0, zoom_height=0.0, zoom_width=0.0)
    p = sample_params(64, cfg, "cpu", torch.Generator().manual_seed(0))
    assert not p.flip.any()
    assert torch.all(p.angle == 0) and torch.all(p.contrast == 1)
    assert torch.all(p.zoom_h == 1) and torch.all(p.zoom_w == 1)
    x = rand_image(4, 3, 16, 16)
    torch.testing.assert_close(augment(x, cfg), x, **EXACT)


# -- geometry, exact cases ------------------------------------------------------------------


def test_identity_params_give_back_the_input():
    x = rand_image(2, 3, 24, 40)
    torch.testing.assert_close(geometry(x), x, **EXACT)


def test_flip_is_horizontal_mirror():
    x = rand_image(2, 3, 16, 20)
    torch.testing.assert_close(geometry(x, flip=True), torch.flip(x, dims=[-1]), **EXACT)


def test_positive_angle_turns_counter_clockwise():
    x = rand_image(2, 3, 16, 16)
    ccw = torch.rot90(x, 1, dims=(-2, -1))  # top-right corner moves to the top-left
    torch.testing.assert_close(geometry(x, angle=math.pi / 2), ccw, **EXACT)
    cw = torch.rot90(x, -1, dims=(-2, -1))
    torch.testing.assert_close(geometry(x, angle=-math.pi / 2), cw, **EXACT)


def test_rotation_is_rigid_on_non_square_images():
    x = rand_image(1, 3, 24, 40)
    half_turn = torch.flip(x, dims=[-2, -1])
    torch.testing.assert_close(geometry(x, angle=math.pi), half_turn, **EXACT)
    # the central 24x24 square turns onto itself; a shear (no aspect correction) would not
    out = geometry(x, angle=math.pi / 2)
    square = x[..., :, 8:32]
    torch.testing.assert_close(out[..., :, 8:32], torch.rot90(square, 1, dims=(-2, -1)), **EXACT)


def reflect_sample(pos, size):
    """Where grid_sample's reflection padding (align_corners=False) reads coordinate pos."""
    lo, span = -0.5, float(size)
    pos = (pos - lo) % (2 * span)
    pos = torch.where(pos > span, 2 * span - pos, pos) + lo
    return pos.clamp(0, size - 1)


@pytest.mark.parametrize("zoom", [0.5, 2.0])
def test_zoom_on_a_ramp(zoom):
    h, w = 8, 12
    cols = torch.arange(w, dtype=torch.float32)
    rows = torch.arange(h, dtype=torch.float32)
    ramp_x = cols.expand(1, 1, h, w).clone()  # value = column index, so bilinear is exact
    ramp_y = rows.view(h, 1).expand(1, 1, h, w).clone()

    want_x = reflect_sample((w - 1) / 2 + zoom * (cols - (w - 1) / 2), w).expand(1, 1, h, w)
    torch.testing.assert_close(geometry(ramp_x, zoom_w=zoom), want_x, **EXACT)
    # a width zoom leaves the rows alone and a height zoom the columns
    torch.testing.assert_close(geometry(ramp_y, zoom_w=zoom), ramp_y, **EXACT)
    want_y = reflect_sample((h - 1) / 2 + zoom * (rows - (h - 1) / 2), h).view(h, 1)
    torch.testing.assert_close(
        geometry(ramp_y, zoom_h=zoom), want_y.expand(1, 1, h, w), atol=1e-4, rtol=0
    )
    torch.testing.assert_close(geometry(ramp_x, zoom_h=zoom), ramp_x, **EXACT)


def test_zoom_in_fills_the_output_with_the_centre():
    x = torch.zeros(1, 1, 16, 16)
    x[..., 4:12, 4:12] = 255.0
    out = geometry(x, zoom_h=0.5, zoom_w=0.5)
    # every output pixel but the outermost ring samples the centre block only
    assert torch.all(out[..., 1:-1, 1:-1] == 255.0)
    assert out.min() > 0
    # zooming out 2x shrinks the block to the central 4x4 (plus reflected copies at the edges)
    out = geometry(x, zoom_h=2.0, zoom_w=2.0)
    assert torch.all(out[..., 6:10, 6:10] == 255.0)
    assert torch.all(out[..., 4, 4:12] == 0) and torch.all(out[..., 4:12, 4] == 0)


def test_composition_order_flip_then_rotate():
    x = rand_image(1, 3, 16, 16)
    # layer order: flip the picture, then turn the flipped picture (these do not commute)
    want = torch.rot90(torch.flip(x, dims=[-1]), 1, dims=(-2, -1))
    got = geometry(x, flip=True, angle=math.pi / 2)
    torch.testing.assert_close(got, want, **EXACT)
    assert not torch.allclose(got, torch.flip(torch.rot90(x, 1, dims=(-2, -1)), dims=[-1]))


def test_matrix_is_flip_rot_zoom_product():
    h, w = 24, 40
    p = sample_params(8, AugmentConfig(), "cpu", torch.Generator().manual_seed(3))
    theta = affine_matrices(p, h, w)
    assert theta.shape == (8, 2, 3) and theta.dtype == torch.float32
    s = torch.diag(torch.tensor([w / 2, h / 2], dtype=torch.float64))
    for i in range(8):
        f = torch.diag(torch.tensor([-1.0 if p.flip[i] else 1.0, 1.0], dtype=torch.float64))
        c, sn = math.cos(p.angle[i].item()), math.sin(p.angle[i].item())
        r = s.inverse() @ torch.tensor([[c, -sn], [sn, c]], dtype=torch.float64) @ s
        z = torch.diag(torch.tensor([p.zoom_w[i].item(), p.zoom_h[i].item()], dtype=torch.float64))
        torch.testing.assert_close(theta[i, :, :2].double(), f @ r @ z, atol=1e-6, rtol=0)
        assert torch.all(theta[i, :, 2] == 0)


# -- whole pipeline -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 3, 32, 32), (4, 3, 24, 40), (2, 1, 17, 9)])
def test_augment_shape_dtype_and_range(shape):
    g = torch.Generator().manual_seed(5)
    x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    out = augment(x, generator=g)
    assert out.shape == shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 255
    assert torch.isfinite(out).all()


def test_empty_batch():
    out = augment(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))
    assert out.shape == (0, 3, 8, 8) and out.dtype == torch.float32


def test_uint8_and_float_inputs_agree():
    x = torch.randint(0, 256, (4, 3, 32, 32), generator=torch.Generator().manual_seed(0))
    x = x.to(torch.uint8)
    a = augment(x, generator=torch.Generator().manual_seed(9))
    b = augment(x.float(), generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_reflect_fill_leaves_no_constant_corners():
    x = rand_image(4, 3, 24, 40, low=100.0)
    out = geometry(x, angle=MAX_ANGLE, zoom_h=1.2, zoom_w=1.2)
    assert out.min() >= 100.0 - 1e-3  # a zeros fill would put 0s in the corners
    out = augment(x, generator=torch.Generator().manual_seed(0))
    assert out.min() > 0


@pytest.mark.parametrize("bad", [torch.zeros(3, 32, 32), torch.zeros(1, 1, 3, 32, 32)])
def test_non_4d_input_is_rejected(bad):
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        augment(bad)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        augment_reference_bug(bad)


# -- contrast -------------------------------------------------------------------------------


def test_contrast_factor_one_is_identity():
    x = rand_image(3, 3, 8, 8)
    torch.testing.assert_close(apply_contrast(x, torch.ones(3)), x, **EXACT)


def test_contrast_keeps_channel_means_and_scales_per_image():
    x = rand_image(2, 3, 8, 8, low=-50.0, high=300.0)
    factor = torch.tensor([0.5, 1.5])
    out = apply_contrast(x, factor, clip=None)
    mean = x.mean(dim=(-2, -1), keepdim=True)
    torch.testing.assert_close(out.mean(dim=(-2, -1), keepdim=True), mean, **EXACT)
    torch.testing.assert_close(out - mean, (x - mean) * factor.view(2, 1, 1, 1), **EXACT)


def test_contrast_clips_to_pixel_range():
    x = torch.zeros(1, 1, 2, 2)
    x[..., 0, :] = 255.0  # mean 127.5, deviations +-127.5
    out = apply_contrast(x, torch.tensor([1.1]))
    assert out.min() == 0 and out.max() == 255
    out = apply_contrast(x, torch.tensor([1.1]), clip=None)
    assert out.min() < 0 and out.max() > 255


# -- the reference's bug --------------------------------------------------------------------


def test_reference_bug_wipes_out_negative_normalized_values():
    g = torch.Generator().manual_seed(0)
    x_norm = torch.randn(16, 3, 32, 32, generator=g)
    out = augment_reference_bug(x_norm, generator=g)
    assert out.min() >= 0
    assert (out == 0).float().mean() > 0.4  # about half the values were negative

    # smooth pixel images (4x4 blocks), so that interpolation itself hardly lowers the spread
    blocks = torch.randint(0, 256, (16, 3, 8, 8), generator=g).float()
    pixels = blocks.repeat_interleave(4, dim=-2).repeat_interleave(4, dim=-1)
    fixed = augment(pixels, generator=g)
    assert (fixed == 0).float().mean() < 0.01
    assert fixed.std() > 0.8 * pixels.std()


# -- randomness -----------------------------------------------------------------------------


def test_seeded_generator_is_deterministic():
    x = rand_image(4, 3, 32, 32)
    a = augment(x, generator=torch.Generator().manual_seed(42))
    b = augment(x, generator=torch.Generator().manual_seed(42))
    c = augment(x, generator=torch.Generator().manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_is_deterministic_and_untouched_by_generators():
    x = rand_image(4, 3, 32, 32)
    torch.manual_seed(7)
    a = augment(x)
    torch.manual_seed(7)
    b = augment(x)
    assert torch.equal(a, b)
    state = torch.get_rng_state()
    augment(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.get_rng_state(), state)


# -- config ---------------------------------------------------------------------------------


def test_default_config_is_the_reference():
    cfg = AugmentConfig()
    assert (cfg.flip, cfg.rotation, cfg.contrast) == (True, 0.1, 0.1)
    assert (cfg.zoom_height, cfg.zoom_width) == (0.2, 0.2)
    AugmentConfig(rotation=0.5, contrast=0.0, zoom_height=0.0, zoom_width=0.99)  # edges are fine


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rotation", -0.1),
        ("rotation", 0.6),
        ("rotation", float("nan")),
        ("contrast", -0.01),
        ("contrast", 1.0),
        ("zoom_height", 1.0),
        ("zoom_height", -0.2),
        ("zoom_width", 1.5),
        ("zoom_width", "0.2"),
        ("flip", 1),
    ],
)
def test_bad_config_raises(field, value):
    with pytest.raises(ConfigError, match=field):
        AugmentConfig(**{field: value})
