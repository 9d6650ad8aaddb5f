"""The modern recipe's batched augmentations: ranges, rates, label sums, erased area."""

import pytest
import torch

from eanet.data.crop import crop_flip_thetas, random_resized_crop_flip
from eanet.data.erasing import ERASE_AREA, erase_masks, random_erase
from eanet.data.mixing import MixConfig, mix_batch, mixed_targets
from eanet.data.randaugment import OPS, apply_op, rand_augment


def _images(n=64, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g).float()


@pytest.mark.parametrize("op", OPS)
def test_every_randaugment_op_keeps_pixels_in_range_and_shape(op):
    torch.manual_seed(0)
    x = _images(8)
    out = apply_op(x, op, torch.full((8,), 9.0))
    assert out.shape == x.shape
    assert out.min() >= -1e-3 and out.max() <= 255 + 1e-3, op
    assert not torch.equal(out, x) or op in ("equalize", "auto_contrast"), op


def test_randaugment_ops_at_known_values():
    x = torch.tensor([[[[0.0, 100.0], [200.0, 255.0]]]]).repeat(1, 3, 1, 1)
    m10 = torch.tensor([10.0])
    assert torch.equal(apply_op(x, "invert", m10), 255 - x)
    assert torch.equal(
        apply_op(x, "solarize", torch.tensor([5.0])), torch.where(x >= 128, 255 - x, x)
    )
    assert apply_op(x, "posterize", torch.tensor([0.0])).eq(torch.floor(x / 16) * 16).all()
    low = torch.tensor([[[[10.0, 20.0], [30.0, 40.0]]]])
    assert apply_op(low, "auto_contrast", m10).flatten().tolist() == [0.0, 85.0, 170.0, 255.0]


def test_randaugment_changes_about_the_expected_share_of_images():
    # Two layers, each applied with probability 0.5: about 3/4 of the images change.
    torch.manual_seed(0)
    x = _images(400, 8)
    out = rand_augment(x, num_ops=2, magnitude=9.0, magnitude_std=0.5)
    changed = (out - x).abs().flatten(1).amax(1) > 1e-3
    assert 0.6 < changed.float().mean() < 0.85
    assert out.min() >= -1e-3 and out.max() <= 255 + 1e-3


def test_randaugment_is_deterministic_under_the_seed():
    torch.manual_seed(3)
    a = rand_augment(_images(32), 2, 9.0, 0.5)
    torch.manual_seed(3)
    b = rand_augment(_images(32), 2, 9.0, 0.5)
    assert torch.equal(a, b)


def test_crop_keeps_at_least_the_scale_area_and_flips_half():
    torch.manual_seed(0)
    theta = crop_flip_thetas(4000, "cpu")
    area = (theta[:, 0, 0].abs() * theta[:, 1, 1]).numpy()  # relative width x height
    assert area.min() >= 0.8 * 0.85 and area.max() <= 1.0 + 1e-6  # clamped sides may shrink
    assert abs((theta[:, 0, 0] < 0).float().mean().item() - 0.5) < 0.03
    inside = theta[:, 0, 0].abs() + theta[:, 0, 2].abs()
    assert inside.max() <= 1.0 + 1e-6  # the crop never leaves the image
    out = random_resized_crop_flip(_images(8))
    assert out.shape == (8, 3, 16, 16) and out.min() >= 0 and out.max() <= 255


def test_erasing_rate_and_area_fraction():
    torch.manual_seed(0)
    masks = erase_masks(4000, 32, 32, prob=0.25, device="cpu")
    frac = masks.flatten(1).float().mean(1)
    erased = frac > 0
    assert abs(erased.float().mean().item() - 0.25) < 0.03
    assert frac[erased].min() >= 0.5 * ERASE_AREA[0]  # rounding and clamping at the borders
    assert frac[erased].max() <= ERASE_AREA[1] * 1.5
    assert 0.08 < frac[erased].mean() < 0.2  # uniform area in [0.02, 1/3]: mean ~0.18, clamps lower
    x = _images(16, 32)
    out = random_erase(x, 1.0)
    assert out.shape == x.shape and not torch.equal(out, x)


@pytest.mark.parametrize(
    "cfg",
    [MixConfig(mixup_alpha=0.8), MixConfig(cutmix_alpha=1.0), MixConfig(0.8, 1.0, 1.0, 0.5)],
)
def test_mixed_labels_sum_to_one_and_match_the_pixels(cfg):
    torch.manual_seed(0)
    for _ in range(20):
        x = _images(8, 16)
        y = torch.randint(0, 10, (8,))
        mixed, lam = mix_batch(x, cfg)
        assert 0 <= lam <= 1
        t = mixed_targets(y, lam, 10)
        assert torch.allclose(t.sum(1), torch.ones(8))
        # The share of the partner's pixels (CutMix) or the blend (mixup) is 1 - lam.
        if cfg.mixup_alpha == 0:
            from_self = (mixed == x).float().mean()
            assert abs(from_self - lam) < 0.05
        elif cfg.cutmix_alpha == 0:
            assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-3)


def test_mix_prob_zero_leaves_the_batch():
    x = _images(4)
    mixed, lam = mix_batch(x, MixConfig(0.8, 1.0, prob=0.0))
    assert torch.equal(mixed, x) and lam == 1
