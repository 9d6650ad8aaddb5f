"""`resolve_config`: the rules of `eanet train`'s options as a function of plain mappings."""

from __future__ import annotations

import json

import pytest

import eanet.train
from eanet.errors import ConfigError
from eanet.train.config import TrainConfig
from eanet.train.recipes import load_recipe
from eanet.train.resolve import resolve_config


def _save_run(run, cfg: TrainConfig) -> None:
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"train": cfg.to_dict()}))


def test_the_api_reaches_it():
    assert eanet.train.resolve_config is resolve_config


def test_the_defaults_are_the_reference_recipe(tmp_path):
    cfg, out, resume = resolve_config({}, out=tmp_path / "x")
    assert (cfg, out, resume) == (TrainConfig(), tmp_path / "x", False)
    cfg, out, _ = resolve_config({})
    assert out.parent.name == "runs" and out.name.startswith("eanet-cifar-cifar100-")


def test_flags_over_config_over_recipe_over_defaults(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("lr: 0.002\nepochs: 7\nmodel_args: {depth: 2}\n")
    flags = {"recipe": "modern", "epochs": 5}
    for config in (f, str(f), {"lr": 0.002, "epochs": 7, "model_args": {"depth": 2}}):
        cfg, _, _ = resolve_config(flags, config, out="x")
        assert cfg.recipe == "modern" and cfg.epochs == 5  # flag over file
        assert cfg.lr == 0.002  # file over recipe
        assert cfg.weight_decay == 0.06 and cfg.mixup_alpha == 0.8  # recipe over defaults
        assert cfg.model_args == {"drop_path": 0.1, "depth": 2}  # merged key by key
        assert cfg.adam_eps == TrainConfig().adam_eps  # the default where nobody says
    from_file, _, _ = resolve_config({}, {"recipe": "modern"}, out="x")
    assert from_file.lr == load_recipe("modern")["lr"]


def test_unknown_options_in_the_config_name_it(tmp_path):
    with pytest.raises(ConfigError, match="config: unknown option 'nope'"):
        resolve_config({}, {"nope": 1}, out="x")


def test_resume_merges_by_the_resume_rules(tmp_path):
    run = tmp_path / "run"
    _save_run(run, TrainConfig(epochs=3))
    cfg, out, resume = resolve_config({"epochs": 9}, resume=run)
    assert (cfg, out, resume) == (TrainConfig(epochs=9), run, True)  # CHANGE: applied
    with pytest.raises(ConfigError, match="--lr 0.01 differs from the run's 0.001"):
        resolve_config({"lr": 0.01}, resume=run)  # MATCH: refused
    with pytest.raises(ConfigError, match="name two runs"):
        resolve_config({}, resume=run, out=tmp_path / "other")


def test_auto_resume_starts_then_refuses_another_recipe(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="--auto-resume needs --out"):
        resolve_config({}, auto_resume=True)
    cfg, out, resume = resolve_config({}, out=run, auto_resume=True)
    assert (cfg, out, resume) == (TrainConfig(), run, False)  # nothing there: a new run
    _save_run(run, cfg)
    cfg, _, resume = resolve_config({"epochs": 2}, out=run, auto_resume=True)
    assert cfg.epochs == 2 and not resume  # a config but no checkpoint: started again
    with pytest.raises(ConfigError, match="was trained with --recipe 'reference'"):
        resolve_config({"recipe": "modern"}, out=run, auto_resume=True)


def test_with_overrides_is_the_defaults_with_the_mapping_applied():
    cfg = TrainConfig().with_overrides({"epochs": 4, "model_args": {"depth": 2}})
    assert cfg == TrainConfig(epochs=4, model_args={"depth": 2})
    assert cfg.with_overrides({"lr": 0.01}).epochs == 4
    with pytest.raises(ConfigError, match="--epochs"):
        TrainConfig().with_overrides({"epochs": 0})
