"""Recipes as files, the modern recipe's schedule, EMA and drop-path, best/EMA weights, logs."""

import argparse
import json
import math

import pytest
import torch
import yaml

from eanet import checkpoint
from eanet.cli.commands import train_config_from_args
from eanet.cli.main import main
from eanet.cli.parser import build_parser
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.errors import ConfigError
from eanet.models.config import ModelConfig
from eanet.models.layers import drop_path
from eanet.models.registry import create_model
from eanet.options import to_yaml
from eanet.train import loop as train_loop
from eanet.train.config import TrainConfig
from eanet.train.ema import EMA
from eanet.train.loop import fit
from eanet.train.recipes import load_recipe, recipe_names
from eanet.train.schedule import LRSchedule
from eanet.train.step import decay_groups

TINY = {"depth": 2, "dim": 32, "mlp_dim": 32}

# Every modern ingredient at once, scaled to a tiny run (the modern recipe's own values).
MODERN_TINY = {
    **{k: v for k, v in load_recipe("modern").items() if k not in ("epochs", "batch_size")},
    "recipe": "modern",
    "model_args": {**TINY, "drop_path": 0.1},
    "epochs": 3,
    "batch_size": 32,
    "device": "cpu",
}


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["train", *argv])


def test_recipes_are_listed_and_load_as_train_configs(capsys):
    assert recipe_names()[:2] == ("reference", "modern")
    for name in recipe_names():
        TrainConfig(**{**load_recipe(name), "recipe": name})
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "modern" in out and "CCT" in out


def test_the_reference_recipe_is_the_defaults():
    cfg, _, _ = train_config_from_args(_args("--out", "x"))
    assert cfg == TrainConfig()
    explicit, _, _ = train_config_from_args(_args("--recipe", "reference", "--out", "x"))
    assert explicit == TrainConfig()
    assert all(getattr(TrainConfig(), k) == v for k, v in load_recipe("reference").items())


def test_flags_over_config_over_recipe_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.002\nepochs: 7\nmodel_args: {depth: 2}\n")
    cfg, _, _ = train_config_from_args(
        _args("--recipe", "modern", "--config", str(f), "--epochs", "5", "--out", "x")
    )
    assert cfg.recipe == "modern" and cfg.epochs == 5  # flag over file
    assert cfg.lr == 0.002  # file over recipe
    assert cfg.weight_decay == 0.06 and cfg.mixup_alpha == 0.8  # recipe over defaults
    assert cfg.model_args == {"drop_path": 0.1, "depth": 2}  # merged key by key
    assert cfg.adam_eps == TrainConfig().adam_eps  # the default where nobody says
    f.write_text("recipe: modern\n")
    from_file, _, _ = train_config_from_args(_args("--config", str(f), "--out", "x"))
    assert from_file.lr == 6e-4


def test_a_saved_modern_config_round_trips(tmp_path):
    cfg, _, _ = train_config_from_args(_args("--recipe", "modern", "--out", "x"))
    f = tmp_path / "config.yaml"
    f.write_text(to_yaml(cfg.to_dict()))
    again, _, _ = train_config_from_args(_args("--config", str(f), "--out", "x"))
    assert again == cfg


def test_unknown_recipe_and_impossible_combinations_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--recipe", "nope", "--out", "x"])
    assert "invalid choice: 'nope'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="reference-bug"):
        TrainConfig(augment="reference-bug", mixup_alpha=0.8)
    with pytest.raises(ConfigError, match="--ema-decay"):
        TrainConfig(ema_decay=1.0)
    with pytest.raises(ConfigError, match="--warmup-fraction"):
        TrainConfig(warmup_fraction=1.5)


def test_cosine_schedule_at_known_steps():
    s = LRSchedule("cosine", 1e-3, total_steps=101, warmup_fraction=0.1, warmup_lr=0.0, min_lr=1e-5)
    assert s.warmup_steps == 10
    assert s(0) == 0.0 and s(5) == pytest.approx(5e-4)
    assert s(10) == pytest.approx(1e-3)  # peak right after the warm-up
    mid = 10 + 45  # half way through the cosine
    assert s(mid) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))
    assert s(100) == pytest.approx(1e-5)  # the floor at the last step
    assert all(s(t) >= s(t + 1) for t in range(10, 100))
    assert LRSchedule("constant", 1e-3, 50)(37) == 1e-3


def test_ema_arithmetic_on_a_toy_model():
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    expected = 0.0
    for t in range(1, 6):
        with torch.no_grad():
            model.weight.fill_(float(t))
        d = min(0.5, (1 + t) / (10 + t))
        assert ema.current_decay() == d
        ema.update(model)
        expected = d * expected + (1 - d) * t
        assert ema.shadow["weight"].item() == pytest.approx(expected)
    clone = torch.nn.Linear(1, 1, bias=False)
    ema2 = EMA(clone, 0.5)
    ema2.load(ema.tensors())
    assert ema2.updates == 5 and torch.equal(ema2.shadow["weight"], ema.shadow["weight"])


def test_drop_path_is_identity_at_eval_and_at_zero_and_scales_in_training():
    x = torch.randn(1000, 4, 8)
    assert drop_path(x, 0.3, training=False) is x
    assert drop_path(x, 0.0, training=True) is x
    torch.manual_seed(0)
    y = drop_path(x, 0.3, training=True)
    kept = (y != 0).flatten(1).all(1)
    assert abs(kept.float().mean().item() - 0.7) < 0.05
    assert torch.allclose(y[kept], x[kept] / 0.7)
    model = create_model("eanet-cifar", **TINY, drop_path=0.2).eval()
    plain = create_model("eanet-cifar", **TINY)
    plain.load_state_dict(model.state_dict())
    images = torch.randint(0, 256, (2, 3, 32, 32)).float()
    assert torch.equal(model(images), plain.eval()(images))
    assert [b.drop_path for b in model.blocks] == [0.0, 0.2]
    with pytest.raises(ConfigError, match="drop_path"):
        ModelConfig(drop_path=1.0)


def test_weight_decay_on_matrices_only():
    model = create_model("eanet-cifar", **TINY)
    decay, no_decay = decay_groups(model, 0.06)
    assert decay["weight_decay"] == 0.06 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim == 2 for p in decay["params"])
    assert any(p is model.patch_embed.pos_embed for p in no_decay["params"])
    assert all(p.ndim == 1 or p is model.patch_embed.pos_embed for p in no_decay["params"])
    n = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(decay["params"]) + len(no_decay["params"]) == n


class _Stop(Exception):
    pass


@pytest.mark.slow
def test_modern_recipe_resumes_bit_exactly_with_everything_on(tmp_path, small_sample, monkeypatch):
    cfg = TrainConfig(**MODERN_TINY)
    assert (
        cfg.uses_pixel_extras and cfg.ema_decay and cfg.grad_clip and cfg.lr_schedule != "constant"
    )
    fit(cfg, tmp_path / "straight", data=small_sample, progress=False)
    save = train_loop._save_epoch

    def save_then_stop(run, row):  # the run dies right after its first epoch is saved
        save(run, row)
        if row["epoch"] == 1:
            raise _Stop

    monkeypatch.setattr(train_loop, "_save_epoch", save_then_stop)
    with pytest.raises(_Stop):
        fit(cfg, tmp_path / "split", data=small_sample, progress=False)
    monkeypatch.setattr(train_loop, "_save_epoch", save)
    fit(cfg, tmp_path / "split", data=small_sample, resume=True, progress=False)
    a, b = checkpoint.load(tmp_path / "straight"), checkpoint.load(tmp_path / "split")
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
    for idx, state in a.optimizer_state["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b.optimizer_state["state"][idx][name]), (idx, name)
    assert a.extra.keys() == b.extra.keys() and any(k.startswith("ema.") for k in a.extra)
    for key in a.extra:
        assert torch.equal(a.extra[key], b.extra[key]), key
    assert int(a.extra["ema_updates"]) == 3 * math.ceil(77 / 32)
    untimed = [
        {k: v for k, v in h.items() if "second" not in k and "per_s" not in k}
        for h in a.meta.history
    ]
    assert untimed == [
        {k: v for k, v in h.items() if "second" not in k and "per_s" not in k}
        for h in b.meta.history
    ]
    assert "ema_val_top1" in a.meta.history[0] and "lr" in a.meta.history[0]
    metrics = json.loads((tmp_path / "split" / "metrics.json").read_text())
    for key in ("best_epoch", "best_test_top1", "ema_test_top1", "test_top1"):
        assert key in metrics, key
    best = checkpoint.load(tmp_path / "split" / "best.safetensors")
    assert best.meta.epoch == metrics["best_epoch"]
    assert best.meta.history[-1]["val_top1"] == max(h["val_top1"] for h in b.meta.history)


@pytest.mark.slow
def test_weights_choice_loads_last_best_and_ema(tmp_path, small_sample, capsys):
    cfg = TrainConfig(model_args=TINY, epochs=2, batch_size=32, device="cpu", ema_decay=0.9)
    fit(cfg, tmp_path / "run", data=small_sample, progress=False)
    last, _ = checkpoint.load_model(tmp_path / "run")
    best, ckpt = checkpoint.load_model(tmp_path / "run", weights="best")
    ema, _ = checkpoint.load_model(tmp_path / "run", weights="ema")
    assert ckpt.meta.epoch in (1, 2)
    w = "blocks.0.mlp.fc1.weight"
    assert not torch.equal(last.state_dict()[w], ema.state_dict()[w])
    plain = TrainConfig(model_args=TINY, epochs=1, batch_size=32, device="cpu")
    fit(plain, tmp_path / "plain", data=small_sample, progress=False)
    assert main(["evaluate", str(tmp_path / "plain"), "--weights", "ema"]) == 2
    assert "no moving average" in capsys.readouterr().err
    run = str(tmp_path / "run")
    data = ["--data-path", str(SAMPLE_ARCHIVE), "--md5", SAMPLE_MD5, "--no-progress"]
    assert main(["evaluate", run, "--weights", "best", *data]) == 0
    assert (tmp_path / "run" / "evaluation_test_best.json").is_file()


@pytest.mark.slow
def test_tensorboard_events_read_back(tmp_path, small_sample):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = TrainConfig(
        model_args=TINY,
        epochs=2,
        batch_size=32,
        device="cpu",
        log="tensorboard",
        lr_schedule="cosine",
        warmup_fraction=0.25,
    )
    fit(cfg, tmp_path, data=small_sample, progress=False)
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    steps = 2 * math.ceil(77 / 32)
    assert [e.step for e in acc.Scalars("step/lr")] == list(range(steps))
    lrs = [e.value for e in acc.Scalars("step/lr")]
    assert lrs[0] == 0.0 and max(lrs) == pytest.approx(1e-3, rel=1e-6)
    assert len(acc.Scalars("step/train_loss")) == steps
    for tag in ("epoch/train_loss", "epoch/val_top1", "epoch/train_images_per_s", "epoch/lr"):
        assert [e.step for e in acc.Scalars(tag)] == [1, 2], tag
    assert "train/augmented_images" in tags["images"]
    history = json.loads((tmp_path / "history.json").read_text())
    assert acc.Scalars("epoch/val_top1")[1].value == pytest.approx(history[1]["val_top1"])


def test_compare_trains_both_models_under_the_named_recipe():
    from eanet.cli.commands import compare_config_from_args
    from eanet.compare.report import _recipe_words

    args = build_parser().parse_args(
        ["compare", "--recipe", "modern", "--epochs", "4", "--out", "x"]
    )
    cfg = compare_config_from_args(args)
    assert cfg.models == ["eanet-cifar", "vit-cifar"] and cfg.augment_orders == ["crop-flip"]
    for model, augment, seed in cfg.runs():
        run = cfg.train_config(model, augment, seed)
        assert run.recipe == "modern" and run.epochs == 4 and run.mixup_alpha == 0.8
    assert "--recipe modern" in cfg.command("x")
    assert "`--recipe modern`" in _recipe_words(cfg.train.to_dict())
    plain = compare_config_from_args(build_parser().parse_args(["compare", "--out", "x"]))
    assert plain.train == TrainConfig() and plain.augment_orders == ["fixed"]
    assert "`--recipe reference`" in _recipe_words(plain.train.to_dict())


def test_tensorboard_missing_is_a_one_line_error_before_any_file(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    cfg = TrainConfig(model_args=TINY, epochs=1, device="cpu", log="tensorboard")
    with pytest.raises(ConfigError, match=r"pip install 'eanet\[tensorboard\]'"):
        fit(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_modern_recipe_trains_a_folder_data_set_end_to_end(tmp_path, image_folder, capsys):
    """`eanet train --recipe modern` on your own images: a folder of real PNGs, then predict."""
    from eanet.cli.main import main

    run = tmp_path / "run"
    tiny = ["--model-arg", "depth=1", "--model-arg", "dim=32", "--model-arg", "mlp_dim=32"]
    argv = ["train", "--recipe", "modern", "--dataset", "folder", "--data-path", str(image_folder)]
    argv += [*tiny, "--epochs", "2", "--batch-size", "16", "--device", "cpu", "--no-progress"]
    assert main([*argv, "--out", str(run)]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["recipe"] == "modern" and saved["lr_schedule"] == "cosine"
    assert (run / "best.safetensors").is_file()
    capsys.readouterr()
    image = next((image_folder / "test").rglob("*.png"))
    assert main(["predict", str(run), str(image), "--weights", "ema", "--top-k", "1"]) == 0
    assert image.name in capsys.readouterr().out


def test_init_from_keeps_the_checkpoints_architecture_under_a_recipe(tmp_path, capsys):
    """A recipe's model options (drop_path) must not stop --init-from inheriting the model."""
    model = create_model("eanet-cifar", depth=1, dim=32, mlp_dim=32, num_classes=3)
    ckpt = tmp_path / "small.safetensors"
    checkpoint.save(ckpt, model, {"class_names": ["a", "b", "c"], "model_name": "eanet-cifar"})
    args = build_parser().parse_args(["train", "--recipe", "modern", "--init-from", str(ckpt)])
    cfg, _, _ = train_config_from_args(args)
    assert cfg.model_args["depth"] == 1 and cfg.model_args["dim"] == 32
    assert cfg.model_args["drop_path"] == load_recipe("modern")["model_args"]["drop_path"]
