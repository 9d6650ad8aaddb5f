"""Config values that would over-allocate or run for ever are one line, before any work.

Each case is a value a config file or a flag can carry (a typo such as 1e12 for 1e2) that
would otherwise end in a traceback (a seed of 1e26, 10^12 synthetic images), an out-of-memory
crash (dim=100000) or a run that never ends (depth=1e9); an infinite LayerNorm epsilon is no
epsilon; and an invalid model option must be reported before the data set is looked for.
"""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest

from eanet.cli.main import main
from eanet.errors import ConfigError
from eanet.models.config import ModelConfig
from eanet.options import Bounds, check_ranges, declared, flag, value_type
from eanet.train.config import TrainConfig


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dim": 100_000}, "dim=100000 is over its bound"),
        ({"depth": 10**9}, "depth=1000000000 is over its bound"),
        ({"ln_eps": float("inf")}, "ln_eps=inf must be a finite number"),
        ({"memory_size": 10**7}, "memory_size=10000000 is over its bound of 65,536"),
        ({"dim": 8192, "depth": 1024}, "parameters, over the bound"),
    ],
)
def test_model_options_beyond_any_machine_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**options)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dataset": "synthetic", "synthetic_images": 10**12}, "--synthetic-images"),
        ({"seed": 10**26}, "--seed"),
        ({"seed": -1}, "--seed"),
        ({"epochs": 10**12}, "--epochs"),
        ({"batch_size": 10**9}, "--batch-size"),
        ({"adam_eps": float("nan")}, "--adam-eps"),
    ],
)
def test_training_options_beyond_any_machine_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options).validate()


def test_every_registered_model_is_within_the_bounds():
    from eanet.models.registry import MODELS

    for entry in MODELS.values():
        entry.config.validate()  # raises if a registered model broke a bound


def test_an_invalid_model_option_is_reported_before_the_data_is_looked_for(
    tmp_path, capsys, monkeypatch
):
    """No CIFAR-100 archive in the data cache: the model option's error must come before any
    download is tried."""
    import urllib.request

    def no_download(*args, **kwargs):
        raise AssertionError("a download was tried before the model options were checked")

    monkeypatch.setattr(urllib.request, "urlopen", no_download)
    monkeypatch.setenv("EANET_DATA", str(tmp_path / "data"))
    out = tmp_path / "run"
    assert main(["train", "--model-arg", "dim=100000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "dim=100000 is over its bound" in err
    assert len(err.strip().splitlines()) == 1 and not out.exists()


# ------------------------------------------------------------------ declared ranges, per config


def _configs():
    """One valid instance of every config built with `option(...)`."""
    from eanet.compare.config import CompareConfig
    from eanet.serve.config import ServeConfig

    return [TrainConfig(), CompareConfig(), ServeConfig("x"), ModelConfig()]


def _ranged_fields() -> list[tuple[type, str]]:
    return [
        (type(c), name)
        for c in _configs()
        for name, f in declared(type(c)).items()
        if f.metadata["bounds"] is not None
    ]


def _edges(b: Bounds, integer: bool) -> list[tuple[float, bool]]:
    """(value, admitted) at each declared end: the edge admitted, the next number refused."""

    def step(x: float, direction: int) -> float:
        return x + direction if integer else math.nextafter(x, direction * math.inf)

    out: list[tuple[float, bool]] = []
    if b.positive:
        out += [(1 if integer else math.nextafter(0.0, 1.0), True), (0, False)]
    if b.low is not None:
        out += [(b.low, True), (step(b.low, -1), False)]
    if b.high is not None and b.high_open:
        out += [(step(b.high, -1), True), (b.high, False)]
    elif b.high is not None:
        out += [(b.high, True), (step(b.high, 1), False)]
    if b.cap is not None:
        out += [(b.cap, True), (step(b.cap, 1), False)]
    if not integer:
        out = [(float(v), ok) for v, ok in out] + [(math.inf, False), (math.nan, False)]
    return out


def test_the_configs_declare_ranges_on_numbers_only():
    fields = _ranged_fields()
    assert len(fields) > 40  # train, compare, serve and model options
    for cls, name in fields:
        assert value_type(cls, name) in (int, float), f"{cls.__name__}.{name}"


@pytest.mark.parametrize(
    ("cls", "name"), _ranged_fields(), ids=lambda v: v if isinstance(v, str) else v.__name__
)
def test_each_declared_range_admits_its_edge_and_refuses_just_outside(cls, name):
    (base,) = [c for c in _configs() if type(c) is cls]
    bounds = declared(cls)[name].metadata["bounds"]
    for value, admitted in _edges(bounds, integer=value_type(cls, name) is int):
        obj = copy.copy(base)
        setattr(obj, name, value)  # the range alone: no other option's rule in the way
        if admitted:
            check_ranges(obj)
            continue
        with pytest.raises(ConfigError) as info:
            check_ranges(obj)
        assert flag(name) in str(info.value), (value, str(info.value))
        assert len(str(info.value).splitlines()) == 1


def test_validate_checks_the_declared_ranges_of_every_config():
    from eanet.compare.config import CompareConfig
    from eanet.serve.config import ServeConfig

    with pytest.raises(ConfigError, match=r"--mix-prob 1.5 must be in \[0, 1\]"):
        TrainConfig(mix_prob=1.5)
    with pytest.raises(ConfigError, match=r"--bench-steps -1 must be >= 0"):
        CompareConfig(bench_steps=-1)
    with pytest.raises(ConfigError, match=r"--port 65536 must be an integer in \[0, 65,535\]"):
        ServeConfig("x", port=65536)
    with pytest.raises(ConfigError, match=r"model option attn_drop=1.0 must be in \[0, 1\)"):
        ModelConfig(attn_drop=1.0)


def test_every_model_option_has_help_and_info_shows_it(capsys):
    fields = declared(ModelConfig)
    assert list(fields) == [f.name for f in dataclasses.fields(ModelConfig)]  # none without
    for name, f in fields.items():
        assert len(f.metadata["help"].strip()) > 10, name
    assert main(["info", "eanet-cifar"]) == 0
    out = capsys.readouterr().out
    for name, f in fields.items():
        assert f.metadata["help"] in out, name
    assert "depth=8" in out and "in [1, 1,024]" in out
