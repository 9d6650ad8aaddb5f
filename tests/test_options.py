"""One source of truth for options: flags, --help, config files and --resume from the fields."""

import importlib
import json
import math
import time

import pytest
import torch
import yaml

from eanet import checkpoint
from eanet.cli.main import main
from eanet.cli.parser import build_parser
from eanet.compare.config import CompareConfig
from eanet.data.cifar import SAMPLE_ARCHIVE, SAMPLE_MD5
from eanet.errors import ConfigError
from eanet.models.config import ModelConfig
from eanet.models.registry import model_config
from eanet.options import (
    CHANGE,
    KEEP,
    MATCH,
    Bounds,
    check_known,
    declared,
    flag,
    from_mapping,
    option,
    read_config_file,
    resume_merge,
    to_argv,
)
from eanet.serve.config import ServeConfig
from eanet.train.config import GROUPS, TrainConfig

SLICE = ["--data-path", str(SAMPLE_ARCHIVE), "--md5", SAMPLE_MD5]
TINY = ["--model-arg", "depth=1", "--model-arg", "dim=32", "--model-arg", "mlp_dim=32"]
QUICK = [*SLICE, *TINY, "--batch-size", "64", "--threads", "1", "--device", "cpu"]


def test_every_training_option_is_declared_with_help_and_a_resume_rule():
    fields = declared(TrainConfig)
    assert len(fields) == len(TrainConfig.__dataclass_fields__)
    for name, f in fields.items():
        assert f.metadata["help"].strip(), name
        assert f.metadata["resume"] in (CHANGE, MATCH, KEEP), name
        assert f.metadata["group"] in GROUPS, f"{name}: its heading in `train --help`"


def test_every_field_is_a_flag_of_train_and_its_help_shows_the_default():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    text = " ".join(text.split())  # argparse wraps the help to the terminal width
    for name in declared(TrainConfig):
        flag = "--model-arg" if name == "model_args" else "--" + name.replace("_", "-")
        assert flag in text, flag
    assert "--lr LR AdamW learning rate" in text and "(default: 0.001) --" in text
    assert "(default: 50) [changeable]" in text
    assert "(default: one per core) [changeable]" in text  # --threads: said once, in words


def test_flags_round_trip_through_to_argv():
    cfg = TrainConfig(lr=0.002, verify=False, model_args={"depth": 2}, precision="bf16")
    args = build_parser().parse_args(["train", *to_argv(cfg)])
    from eanet.cli.flags import given

    assert TrainConfig(**{**TrainConfig().to_dict(), **given(args, TrainConfig)}) == cfg


def test_config_file_errors_name_the_key_and_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lrr: 0.1\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(bad) in err and "'lrr'" in err
    bad.write_text("lr: fast\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert str(bad) in err and "--lr 'fast' must be a number" in err
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_config_file(bad)
    with pytest.raises(ConfigError, match="cannot read the config file"):
        read_config_file(tmp_path / "missing.json")
    assert not (tmp_path / "r").exists()


def _alias_bomb(levels: int = 10) -> str:
    """issue 25's YAML: `[&l0 [nine strings], &l1 [*l0 nine times], ...]`, 9**levels strings."""
    items = ["&l0 [" + ", ".join(["lol"] * 9) + "]"]
    items += [f"&l{i} [" + ", ".join([f"*l{i - 1}"] * 9) + "]" for i in range(1, levels)]
    return "[" + ", ".join(items) + "]"


@pytest.mark.parametrize("where", ["epochs: {}", "model: {}", "model_args: {{depth: {}}}"])
def test_a_yaml_alias_bomb_is_one_line_at_once(tmp_path, capsys, where):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(where.format(_alias_bomb()) + "\n")
    assert bomb.stat().st_size < 600
    with pytest.raises(ConfigError, match="expands to more than 10,000 values"):
        read_config_file(bomb)
    t0 = time.perf_counter()
    assert main(["train", "--config", str(bomb), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert time.perf_counter() - t0 < 5 and err.count("\n") == 0 and str(bomb) in err
    assert not (tmp_path / "r").exists()


def test_a_self_referencing_or_huge_config_file_is_refused(tmp_path):
    loop = tmp_path / "loop.yaml"
    loop.write_text("model_args: &a {x: *a}\n")
    with pytest.raises(ConfigError, match=f"{loop}: expands to more than"):
        read_config_file(loop)
    big = tmp_path / "big.json"
    big.write_text('{"seed": 0, "pad": "' + "x" * (1 << 20) + '"}')
    with pytest.raises(ConfigError, match=f"{big}: larger than 1 MiB"):
        read_config_file(big)


def test_a_wrongly_typed_value_is_shown_bounded():
    bomb = ["lol"] * 9
    for _ in range(7):  # 9**8 strings when expanded
        bomb = [bomb] * 9
    with pytest.raises(ConfigError) as info:
        TrainConfig(epochs=bomb)
    assert str(info.value).startswith("--epochs [[[[") and len(str(info.value)) < 150
    assert str(info.value).endswith("must be an integer, not list")


def test_yaml_numbers_with_an_exponent_are_numbers(tmp_path, capsys):
    cfg = tmp_path / "lr.yaml"
    cfg.write_text("lr: 1e-3\nweight_decay: 5E-5\nmin_lr: 1.0e-6\nwarmup_lr: -0\nmd5: e5\n")
    values = read_config_file(cfg)
    assert values == {"lr": 1e-3, "weight_decay": 5e-5, "min_lr": 1e-6, "warmup_lr": 0, "md5": "e5"}
    assert TrainConfig(lr=values["lr"]).lr == 0.001
    cfg.write_text('lr: "1e-3"\n')  # quoted: a string, and the message says so
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "r")]) == 2
    assert "must be a number, not str; write it as a number, without quotes" in (
        capsys.readouterr().err
    )


def test_resume_merge_applies_changes_and_refuses_the_rest():
    saved = TrainConfig(epochs=2, lr=0.002)
    assert resume_merge(saved, {"epochs": 5, "device": "cpu"}, "RUN").epochs == 5
    assert resume_merge(saved, {"lr": 0.002}, "RUN").lr == 0.002  # the same value is fine
    with pytest.raises(ConfigError, match="--lr 0.01 differs from the run's 0.002"):
        resume_merge(saved, {"lr": 0.01}, "RUN")
    with pytest.raises(ConfigError, match="--precision 'bf16' differs"):
        resume_merge(saved, {"precision": "bf16"}, "RUN")
    with pytest.raises(ConfigError, match="--init-from does not apply to --resume RUN"):
        resume_merge(saved, {"init_from": "x"}, "RUN")


@pytest.mark.slow
def test_config_yaml_reproduces_the_run_bit_for_bit(tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["train", *QUICK, "--epochs", "1", "--seed", "3", "--out", str(first)]) == 0
    saved = yaml.safe_load((first / "config.yaml").read_text())
    assert saved["seed"] == 3 and saved["model_args"] == {"depth": 1, "dim": 32, "mlp_dim": 32}
    assert main(["train", "--config", str(first / "config.yaml"), "--out", str(second)]) == 0
    a, b = checkpoint.load(first), checkpoint.load(second)
    for key in a.model_state:
        assert torch.equal(a.model_state[key], b.model_state[key]), key
    assert json.loads((second / "config.json").read_text())["train"] == saved
    capsys.readouterr()
    # flags override the file
    third = tmp_path / "third"
    argv = ["train", "--config", str(first / "config.yaml"), "--epochs", "2", "--out", str(third)]
    assert main([*argv, "--seed", "4"]) == 0
    assert yaml.safe_load((third / "config.yaml").read_text())["seed"] == 4
    # --resume: a changeable flag is applied, a recipe flag refused in one line, never dropped
    assert main(["train", "--resume", str(first), "--precision", "bf16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--precision 'bf16' differs from the run's 'fp32'" in err
    assert main(["train", "--resume", str(first), "--epochs", "2", "--no-progress"]) == 0
    assert checkpoint.load(first).meta.epoch == 2


# --------------------------------------------------------------------------- declared ranges


# Each word of `option()`'s range vocabulary: the bounds, whether the field is an integer,
# values at the edges (admitted), values just outside (refused), the message, the --help text.
SEED = Bounds(low=0, high=2**63, high_open=True)
RANGES = [
    (Bounds(low=1, high=10**6), True, [1, 10**6], [0, 10**6 + 1], "an integer in [1, 1,000,000]"),
    (SEED, True, [0, 2**63 - 1], [-1, 2**63], "an integer in [0, 2**63)"),
    (Bounds(low=0, high=1, high_open=True), False, [0.0, 0.999], [-0.001, 1.0], "in [0, 1)"),
    (Bounds(low=0, high=10), False, [0.0, 10.0], [-0.5, 10.5], "in [0, 10]"),
    (Bounds(low=0), True, [0, 5], [-1], ">= 0"),
    (Bounds(positive=True), False, [1e-9, 3.0], [0.0, -1.0, math.nan], "a positive number"),
    (Bounds(positive=True), True, [1], [0], "a positive integer"),
    (Bounds(positive=True, cap=64), True, [1, 64], [0], "a positive integer"),
]  # fmt: skip
TEXTS = ["in [1, 1,000,000]", "in [0, 2**63)", "in [0, 1)", "in [0, 10]", ">= 0", "> 0", ">= 1"]


@pytest.mark.parametrize(("bounds", "integer", "admitted", "refused", "wanted"), RANGES)
def test_each_range_word_admits_its_edges_and_says_what_is_wrong(
    bounds, integer, admitted, refused, wanted
):
    assert all(bounds.admits(v) for v in admitted)
    for value in refused:
        assert not bounds.admits(value)
        assert bounds.problem(value, integer) == f"must be {wanted}"


def test_a_cap_and_infinity_have_their_own_words_and_help_shows_each_range():
    cap = Bounds(positive=True, cap=64)
    assert not cap.admits(65) and cap.problem(65, True) == "is over its bound of 64"
    positive = Bounds(positive=True)
    assert positive.problem(math.inf, False) == "must be a finite number > 0"
    texts = [bounds.text(integer) for bounds, integer, *_ in RANGES]
    assert texts == [*TEXTS, "in [1, 64]"]


def test_a_range_is_declared_with_a_clear_vocabulary():
    assert declared(TrainConfig)["lr"].metadata["bounds"] == Bounds(positive=True)
    assert declared(TrainConfig)["model"].metadata["bounds"] is None  # none declared
    with pytest.raises(ValueError, match="high_open=True needs high="):
        option(0.5, help="x", high_open=True)
    with pytest.raises(ValueError, match="low= or positive=True"):
        option(1, help="x", low=1, positive=True)


def test_the_help_of_a_flag_shows_its_range():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    text = " ".join(text.split())
    assert "label smoothing of the cross-entropy; in [0, 1) (default: 0.1)" in text
    assert "cosine); > 0 (default: 0.001)" in text  # --lr
    assert "; in [1, 1,000,000] (default: 50) [changeable]" in text


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize(
    ("module", "call", "what"),
    [
        ("eanet.options", lambda: from_mapping(TrainConfig, {"nope": 1}, "config"), "option"),
        ("eanet.train.config", lambda: TrainConfig.from_dict({"nope": 1}), "training option"),
        ("eanet.models.config", lambda: ModelConfig.from_dict({"nope": 1}), "model option"),
        ("eanet.models.registry", lambda: model_config("vit-cifar", nope=1), "model option"),
        ("eanet.serve.config", lambda: ServeConfig.from_dict({"nope": 1}), "serve setting"),
    ],
)
def test_every_kind_of_config_reports_an_unknown_key_through_check_known(
    monkeypatch, module, call, what
):
    seen = []

    def spy(keys, known, kind="option"):
        seen.append(kind)
        return check_known(keys, known, kind)

    monkeypatch.setattr(importlib.import_module(module), "check_known", spy)
    with pytest.raises(ConfigError) as info:
        call()
    assert seen == [what]
    assert f"unknown {what} 'nope'; known: " in str(info.value)


def test_the_serve_settings_round_trip_as_each_worker_reads_them():
    config = ServeConfig("model.safetensors", max_batch=7, precision="bf16")
    assert ServeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ConfigError, match="serve settings are a list, not an object"):
        ServeConfig.from_dict([])


def test_the_choices_of_a_list_option_are_checked_item_by_item():
    CompareConfig(augment_orders=["fixed", "crop-flip"])
    with pytest.raises(ConfigError, match="--augment-orders 'heavy' must be one of fixed, "):
        CompareConfig(augment_orders=["fixed", "heavy", "none"])


def test_check_known_names_the_first_unknown_key_and_the_known_ones():
    check_known({"a": 1}, ["a", "b"])
    with pytest.raises(
        ConfigError, match=r"^unknown model option 'c' \(and 1 more\); known: a, b$"
    ):
        check_known({"d": 1, "c": 2, "a": 3}, ["b", "a"], "model option")
    with pytest.raises(ConfigError, match="known: attention, attn_drop, depth"):
        check_known(["x" * 10_000], ModelConfig)  # a dataclass: its fields; the key bounded


# --------------------------------------------------------------------------- derived flags


def _parser(command: str):
    return build_parser()._subparsers._group_actions[0].choices[command]


def _help_of(command: str, option_string: str) -> str:
    (action,) = [a for a in _parser(command)._actions if option_string in a.option_strings]
    return action.help


def test_evaluate_and_demo_take_their_flags_from_the_training_options():
    fields = declared(TrainConfig)
    args = build_parser().parse_args(["evaluate", "RUN"])
    assert args.batch_size == TrainConfig().eval_batch_size  # --batch-size: eval_batch_size
    assert _help_of("evaluate", "--batch-size").startswith(
        fields["eval_batch_size"].metadata["help"]
    )
    args = build_parser().parse_args(["demo"])
    assert args.seed == 0 and args.epochs is None  # None: the demo's own CIFAR epochs
    assert build_parser().parse_args(["demo", "--seed", "3", "--epochs", "2"]).seed == 3
    for name in ("seed", "epochs", "device", "threads"):
        assert _help_of("demo", flag(name)).startswith(fields[name].metadata["help"]), name


# Flags that share a field's name but are their command's own: predict's images per forward
# pass (64 by default: a few images answered at once, not a test set's 500 per pass).
OWN_FLAGS = {("predict", "--batch-size")}


def test_no_flag_is_a_hand_declared_copy_of_a_config_field():
    """A flag named as a field's flag takes its help (and so its type and range) from a
    declared field, not from an argparse call of its own."""
    from eanet.compare.config import CompareConfig
    from eanet.serve.config import ServeConfig

    fields = [f for c in (TrainConfig, CompareConfig, ServeConfig) for f in declared(c).values()]
    flags = {flag(f.name) for f in fields} | {"--model-arg"}
    helps = tuple(f.metadata["help"].replace("%", "%%") for f in fields)
    for command, sub in build_parser()._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            for option_string in set(action.option_strings) & flags:
                if (command, option_string) not in OWN_FLAGS:
                    assert action.help.startswith(helps), f"eanet {command} {option_string}"
