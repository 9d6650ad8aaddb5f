"""Training: run directory, exact resume, the bug's input distribution, and real learning."""

import contextlib
import dataclasses
import json

import pytest
import torch

from eanet import checkpoint
from eanet.demo import DIGITS_RECIPE
from eanet.errors import ConfigError, EANetError
from eanet.models.registry import create_model
from eanet.train import loop
from eanet.train.augmentation import BatchAugment
from eanet.train.config import TrainConfig
from eanet.train.distributed import Distributed
from eanet.train.loop import fit
from eanet.train.rundir import load_run_config

TINY = {"depth": 1, "dim": 32, "mlp_dim": 32}


def tiny_config(**kw) -> TrainConfig:
    base = dict(model_args=dict(TINY), epochs=2, batch_size=32, device="cpu")
    return TrainConfig(**{**base, **kw})


def test_run_directory_holds_every_artifact(tmp_path, small_sample):
    metrics = fit(tiny_config(), tmp_path, data=small_sample, progress=False)
    for name in (
        "config.json",
        "history.json",
        "history.csv",
        "curves.png",
        "metrics.json",
        "checkpoint.safetensors",
    ):
        assert (tmp_path / name).stat().st_size > 0, name
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == pytest.approx(metrics)
    for key in ("test_loss", "test_top1", "test_top5"):
        assert 0 <= saved[key] <= (10 if key == "test_loss" else 1)
    assert saved["test_images"] == 64
    history = json.loads((tmp_path / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(h["val_loss"] is not None and h["train_images_per_s"] > 0 for h in history)
    csv_lines = (tmp_path / "history.csv").read_text().splitlines()
    assert csv_lines[0].startswith("epoch,train_loss") and len(csv_lines) == 3
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"]["model_args"] == TINY
    assert config["dataset"] == {
        "name": "cifar100",
        "classes": 100,
        "train_images": 76,
        "val_images": 20,
        "test_images": 64,
    }  # Keras's split: the first floor(96 * 0.8) train, the rest validate
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.meta.epoch == 2 and ckpt.class_names == small_sample.class_names
    assert ckpt.optimizer_state is not None and "cpu" in ckpt.rng_state


def test_resume_reaches_the_same_weights_as_an_uninterrupted_run(tmp_path, small_sample):
    cfg = tiny_config(epochs=3)
    fit(cfg, tmp_path / "straight", data=small_sample, progress=False)
    fit(tiny_config(epochs=1), tmp_path / "split", data=small_sample, progress=False)
    fit(cfg, tmp_path / "split", data=small_sample, resume=True, progress=False)
    a, b = checkpoint.load(tmp_path / "straight"), checkpoint.load(tmp_path / "split")
    assert a.model_state.keys() == b.model_state.keys()
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
    for idx, state in a.optimizer_state["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b.optimizer_state["state"][idx][name]), (idx, name)

    def untimed(history):
        return [
            {k: v for k, v in h.items() if "seconds" not in k and "per_s" not in k} for h in history
        ]

    assert untimed(b.meta.history) == untimed(a.meta.history)
    assert len(b.meta.history) == 3


def test_existing_run_is_never_overwritten_silently(tmp_path, small_sample):
    fit(tiny_config(epochs=1), tmp_path, data=small_sample, progress=False)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    with pytest.raises(EANetError, match="already holds a run.*--resume.*--overwrite"):
        fit(tiny_config(epochs=1), tmp_path, data=small_sample, progress=False)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before
    fit(tiny_config(epochs=1, seed=1), tmp_path, data=small_sample, overwrite=True, progress=False)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() != before


def test_resume_needs_a_checkpoint(tmp_path, small_sample):
    with pytest.raises(EANetError, match="nothing to resume"):
        fit(tiny_config(), tmp_path, data=small_sample, resume=True, progress=False)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"batch_size": 0}, "--batch-size 0"),
        ({"lr": -1.0}, "--lr -1.0"),
        ({"augment": "heavy"}, "--augment 'heavy'"),
        ({"val_fraction": 1.0}, "--val-fraction"),
        ({"model": "resnet"}, "--model 'resnet'"),
    ],
)
def test_impossible_training_options(kw, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**kw).check_model()  # the registry is asked at `fit` (it loads torch)


def test_class_count_override_must_match_the_data(tmp_path, small_sample):
    cfg = tiny_config(model_args={**TINY, "num_classes": 10})
    with pytest.raises(ConfigError, match="num_classes=10 but cifar100 has 100 classes"):
        fit(cfg, tmp_path, data=small_sample, progress=False)


def _built_run(cfg: TrainConfig, out, data, held: contextlib.ExitStack, resume: bool = False):
    """`loop._build_run` in this process (no process group), as `fit` calls it."""
    dist = Distributed(device=torch.device("cpu"))
    return loop._build_run(cfg, out, dist, data, resume, False, held)


def _none_fields(run) -> set[str]:
    return {f.name for f in dataclasses.fields(run) if getattr(run, f.name) is None}


def test_the_run_is_built_complete_with_every_option_on(tmp_path, small_sample):
    cfg = tiny_config(
        ema_decay=0.9, lr_schedule="cosine", grad_clip=1.0, log="tensorboard", erase_prob=0.25
    )
    with contextlib.ExitStack() as held:
        run = _built_run(cfg, tmp_path, small_sample, held)
        assert _none_fields(run) == set()  # nothing left to be filled in later
        assert run.extras.logger is run.logger and run.extras.ema_source is run.model
        assert run.extras.ema is not None and run.extras.schedule is not None
        assert run.batch_augment == BatchAugment.from_config(cfg)
        assert (run.start, run.history) == (1, [])
        assert run.accel is not None and run.runtime.precision == "fp32"
        assert len(run.train_x) + len(run.val_x) == len(small_sample.train_images)
        with pytest.raises(dataclasses.FrozenInstanceError):
            run.logger = None  # only `history` changes, in place


def test_the_reference_recipe_leaves_only_the_documented_parts_out(tmp_path, small_sample):
    """extras, the EMA model and the logger are None for the whole run when off."""
    with contextlib.ExitStack() as held:
        run = _built_run(tiny_config(), tmp_path, small_sample, held)
        assert _none_fields(run) == {"extras", "ema_model", "logger"}
        plain = _built_run(tiny_config(accel=False), tmp_path, small_sample, held)
        assert _none_fields(plain) == {"extras", "ema_model", "logger", "accel"}


def test_a_resumed_run_is_built_with_its_checkpoints_history(tiny_run, small_sample):
    ckpt = checkpoint.load(tiny_run)
    with contextlib.ExitStack() as held:
        run = _built_run(load_run_config(tiny_run), tiny_run, small_sample, held, resume=True)
    assert run.start == ckpt.meta.epoch + 1 == 2 and run.history == ckpt.meta.history
    for key, value in ckpt.model_state.items():
        assert torch.equal(run.model.state_dict()[key], value), key


def _model_inputs(mode: str, images: torch.Tensor) -> torch.Tensor:
    """What the first layer sees in training under an augmentation order."""
    torch.manual_seed(0)
    model = create_model("eanet-cifar", depth=1)
    model.normalize.set_stats(
        images.float().mean((0, 2, 3)), images.float().var((0, 2, 3), unbiased=False), 1
    )
    seen = []
    model.patch_embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    model.train()
    with torch.no_grad():
        BatchAugment(mode)(model, images, torch.zeros(len(images), dtype=torch.long))
    return seen[0]


def test_fixed_order_keeps_negative_inputs_the_reference_order_clips_them(sample_data):
    images = sample_data.train_images[:128]
    fixed = _model_inputs("fixed", images)
    buggy = _model_inputs("reference-bug", images)
    assert (fixed < 0).float().mean() > 0.3  # normalised inputs: about half negative
    assert abs(fixed.mean()) < 0.3
    assert buggy.min() >= 0  # the reference's training inputs: all negatives clipped to 0
    assert (buggy == 0).float().mean() > 0.3
    assert buggy.mean() > 0.2


def test_reference_bug_mode_trains(tmp_path, small_sample):
    metrics = fit(
        tiny_config(epochs=1, augment="reference-bug"), tmp_path, data=small_sample, progress=False
    )
    assert metrics["test_images"] == 64


@pytest.mark.slow
def test_learning_check_on_real_digits(tmp_path, digits_data):
    """EANet must actually learn a real data set: >= 90% on held-out digits.

    Configuration chosen to finish in well under 3 minutes on 2 CPU cores: the reference
    block (external attention, dropout 0.2, Keras init, AdamW, label smoothing) with
    depth 2 and 4x4 patches (64 tokens), lr 2e-3, batch 32, 8 epochs, no augmentation
    (flips and 36-degree rotations change what a digit means). Measured: 97.6% in 27 s.
    """
    cfg = TrainConfig(**DIGITS_RECIPE, device="cpu")  # the demo's part 1 trains the same
    metrics = fit(cfg, tmp_path, data=digits_data, progress=False)
    assert metrics["test_images"] == 449
    assert metrics["test_top1"] >= 0.90, metrics


def test_bf16_autocast_option_trains(tmp_path, small_sample):
    cfg = tiny_config(epochs=1, precision="bf16")
    metrics = fit(cfg, tmp_path, data=small_sample, progress=False)
    assert 0 <= metrics["test_top1"] <= 1
    with pytest.raises(ConfigError, match="--precision 'fp16'"):
        tiny_config(precision="fp16")


def test_synthetic_data_for_timing():
    from eanet.data.dataset import synthetic_cifar
    from eanet.data.load import load_dataset

    d = synthetic_cifar(train=10, test=4)
    assert d.train_images.shape == (10, 3, 32, 32) and d.train_images.dtype == torch.uint8
    assert d.num_classes == 100 and int(d.train_labels.max()) < 100
    assert torch.equal(d.test_images, synthetic_cifar(train=10, test=4).test_images)
    assert load_dataset("synthetic").train_images.shape[0] == 50_000
