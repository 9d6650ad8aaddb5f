"""The one augmentation dispatcher: every --augment and extras combination goes through it."""

import pytest
import torch

from eanet.data.augment import AugmentConfig, augment, augment_reference_bug
from eanet.data.crop import random_resized_crop_flip
from eanet.data.erasing import random_erase
from eanet.data.mixing import MixConfig, mix_batch, mixed_targets
from eanet.data.randaugment import rand_augment
from eanet.models.registry import create_model
from eanet.train import augmentation
from eanet.train import step as step_mod
from eanet.train.augmentation import BatchAugment, RandAugmentSettings
from eanet.train.config import TrainConfig

MIX = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0}
RANDAUG = {"randaugment_ops": 2, "randaugment_magnitude": 9.0, "randaugment_magnitude_std": 0.5}

# (options, the steps that run on a batch in order, soft targets?)
CASES = [
    ({"augment": "fixed"}, ["augment"], False),
    ({"augment": "reference-bug"}, ["augment_reference_bug"], False),
    ({"augment": "none"}, [], False),
    ({"augment": "crop-flip"}, ["crop_flip"], False),
    ({"augment": "fixed", **RANDAUG}, ["augment", "rand_augment"], False),
    ({"augment": "none", "erase_prob": 0.25}, ["erase"], False),
    ({"augment": "crop-flip", "erase_prob": 0.25}, ["crop_flip", "erase"], False),
    ({"augment": "none", "mixup_alpha": 0.8}, ["mix"], True),
    ({"augment": "fixed", "cutmix_alpha": 1.0}, ["augment", "mix"], True),
    ({"augment": "fixed", **MIX, "mix_prob": 0.0}, ["augment"], False),  # mixing off
    (
        {"augment": "crop-flip", **RANDAUG, "erase_prob": 0.25, **MIX},
        ["crop_flip", "rand_augment", "erase", "mix"],
        True,
    ),
]


def _model():
    torch.manual_seed(0)
    model = create_model("eanet-cifar", depth=1, dim=32, mlp_dim=32)
    model.normalize.set_stats(torch.full((3,), 120.0), torch.full((3,), 4000.0), 1)
    return model.train()


def _batch(n: int = 6):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return x, torch.randint(0, 100, (n,), generator=g)


@pytest.fixture
def steps(monkeypatch):
    """Record which augmentation functions the dispatcher calls, in order."""
    called = []

    def recorded(name, fn):
        def wrapper(*args, **kwargs):
            called.append(name)
            return fn(*args, **kwargs)

        monkeypatch.setattr(augmentation, fn.__name__, wrapper)

    recorded("augment", augment)
    recorded("augment_reference_bug", augment_reference_bug)
    recorded("crop_flip", random_resized_crop_flip)
    recorded("rand_augment", rand_augment)
    recorded("erase", random_erase)
    recorded("mix", mix_batch)
    return called


@pytest.mark.parametrize(("options", "expected", "soft"), CASES)
def test_each_combination_runs_its_steps_in_the_fixed_order(steps, options, expected, soft):
    plan = BatchAugment.from_config(TrainConfig(**options))
    x, y = _batch()
    logits, target = plan(_model(), x, y)
    assert steps == expected
    assert logits.shape == (6, 100)
    if soft:
        assert target.shape == (6, 100) and torch.allclose(target.sum(1), torch.ones(6))
    else:
        assert target is y


def test_the_config_is_read_into_the_plan():
    cfg = TrainConfig(augment="crop-flip", **RANDAUG, erase_prob=0.25, **MIX, mix_prob=0.7)
    plan = BatchAugment.from_config(cfg)
    assert plan.order == "crop-flip" and plan.geometry == AugmentConfig()
    assert plan.randaugment == RandAugmentSettings(2, 9.0, 0.5)
    assert plan.erase_prob == 0.25 and plan.mix == MixConfig(0.8, 1.0, 0.7, 0.5)
    assert BatchAugment.from_config(TrainConfig()) == BatchAugment()  # the reference's
    assert BatchAugment.from_config(TrainConfig(mixup_alpha=0.8, mix_prob=0.0)).mix is None


def test_the_same_numbers_as_the_steps_called_by_hand():
    """Bit-identical to the step functions composed by hand, under the same seed."""
    model, (x, y) = _model(), _batch()
    cfg = TrainConfig(augment="fixed", **RANDAUG, erase_prob=0.5, mixup_alpha=0.8)
    torch.manual_seed(5)
    got, got_target = BatchAugment.from_config(cfg)(model, x, y)
    torch.manual_seed(5)
    pixels = rand_augment(augment(x.float(), AugmentConfig()), 2, 9.0, 0.5)
    mixed, lam = mix_batch(random_erase(pixels, 0.5), MixConfig(0.8))
    want = model(mixed)
    assert torch.equal(got, want)
    assert torch.equal(got_target, mixed_targets(y, lam, 100))
    torch.manual_seed(5)
    got, _ = BatchAugment("reference-bug")(model, x, y)
    torch.manual_seed(5)
    want = model(augment_reference_bug(model.normalize(x.float())), normalized=True)
    assert torch.equal(got, want)


def test_pixels_are_the_batch_before_mixing_and_refused_for_the_reference_order():
    x, _ = _batch()
    torch.manual_seed(2)
    got = BatchAugment.from_config(TrainConfig(augment="crop-flip", erase_prob=0.5)).pixels(x)
    torch.manual_seed(2)
    assert torch.equal(got, random_erase(random_resized_crop_flip(x.float()), 0.5))
    assert torch.equal(BatchAugment("none").pixels(x), x.float())
    plan = BatchAugment("reference-bug")
    assert not plan.in_pixel_space
    with pytest.raises(ValueError, match="normalised images"):
        plan.pixels(x)


def test_an_epoch_decides_once_and_every_step_goes_through_the_dispatcher(monkeypatch):
    decided, calls = [], []
    real_decide, real_call = BatchAugment.from_config.__func__, BatchAugment.__call__

    def decide(cls, *args):
        decided.append(args)
        return real_decide(cls, *args)

    def call(self, *args):
        calls.append(self)
        return real_call(self, *args)

    monkeypatch.setattr(BatchAugment, "from_config", classmethod(decide))
    monkeypatch.setattr(BatchAugment, "__call__", call)
    model = _model()
    cfg = TrainConfig(batch_size=16, augment="crop-flip", erase_prob=0.25)
    optimizer = step_mod.make_optimizer(model, cfg)
    x, y = _batch(40)
    step_mod.train_epoch(model, optimizer, x, y, cfg, progress=False)
    assert len(decided) == 1 and len(calls) == 3  # 40 images, batches of 16
    assert all(c == BatchAugment.from_config(cfg) for c in calls)
